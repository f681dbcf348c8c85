"""The layout is the architecture: imports run one way, modules stay small, serving ships alone."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# core <- synthetic <- {training, evaluation} <- export <- serving <- pipeline
RANK = {"core": 0, "synthetic": 1, "training": 2, "evaluation": 2, "export": 3, "serving": 4, "pipeline": 5}


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (anywhere in it, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(RANK)


def _modules(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_imports_run_one_way():
    wrong = []
    for pkg, rank in RANK.items():
        for mod in _modules(pkg):
            for other in _imports(mod):
                if other != pkg and RANK[other] >= rank:
                    wrong.append(f"{mod.relative_to(ROOT)} imports {other}")
    assert not wrong, wrong


def test_import_check_would_catch_a_wrong_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from training.train import main\n")
    assert "training" in _imports(bad)  # a lazy import counts too


def test_modules_stay_small():
    big = [f"{m.relative_to(ROOT)} ({n} lines)" for pkg in RANK for m in _modules(pkg)
           if (n := len(m.read_text().splitlines())) > 450]
    assert not big, big


def test_serving_needs_only_what_the_bento_ships():
    from serving.bento import PACKAGES

    seen, todo = set(), ["serving"]
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        for mod in _modules(pkg):
            if pkg == "export" and mod.name in ("export.py", "bench_worker.py", "report.py"):
                continue  # building and benchmarking variants, not loading them
            todo += sorted(_imports(mod) - seen)
    assert seen == set(PACKAGES) == {"core", "export", "serving"}
    include = (ROOT / "bentofile.yaml").read_text()
    assert "training/" not in include and "evaluation/" not in include
