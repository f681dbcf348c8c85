"""Export, each part on its own (none of these use test_export.py's every-variant export): the shared
sampling loop against diffusers, the ONNX graphs and their checks, export's bad input, a model gated
on its own photos and a hung benchmark."""
import numpy as np
import pytest
import torch

from core.sampling import GenerationRequest
from export.manifest import read_manifest
from tests.conftest import run_cli


def test_engine_matches_diffusers_pipeline(micro_model):
    from diffusers import StableDiffusionPipeline

    from export.common import load_torch_parts, torch_generator

    te, unet, vae = load_torch_parts(micro_model)
    gen = torch_generator(micro_model, te, unet, vae, torch.float32, "cpu")
    ours = gen.generate([GenerationRequest("a red circle on the left", num_inference_steps=4, guidance_scale=4.0,
                                           seed=3)])[0][0]
    pipe = StableDiffusionPipeline.from_pretrained(micro_model)
    ref = pipe("a red circle on the left", num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_engine_batches_mixed_requests_like_single_ones(micro_model):
    from export.common import load_torch_parts, torch_generator

    gen = torch_generator(micro_model, *load_torch_parts(micro_model), torch.float32, "cpu")
    reqs = [GenerationRequest("a red circle", num_inference_steps=3, guidance_scale=2.0, seed=1),
            GenerationRequest("a blue square", num_inference_steps=5, guidance_scale=7.0, seed=2, num_images=2),
            GenerationRequest("a green cross", num_inference_steps=3, guidance_scale=1.0, seed=3,
                              negative_prompt="red")]
    batched = gen.generate(reqs)
    assert [len(x) for x in batched] == [1, 2, 1]
    for r, imgs in zip(reqs, batched):
        alone = gen.generate([r])[0]
        for a, b in zip(alone, imgs):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.fixture(scope="module")
def onnx_external(micro_model, tmp_path_factory):
    """onnx-fp32 of the micro model with its weights forced outside the protobuf (as an SD 1.x UNet's must
    be: see test_onnx_conversions_keep_weights_outside_the_protobuf), and its build notes."""
    from export.variants import onnx as ox

    fp32 = tmp_path_factory.mktemp("onnx") / "fp32"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ox, "EXTERNAL_DATA_MB", 0)
        return fp32, ox.Onnx("fp32").build(micro_model, fp32, "cpu", {})


@pytest.mark.slow
def test_onnx_unet_matches_torch_at_native_and_double_size(micro_model, onnx_external):
    from export.variants.onnx import COMPONENT_ATOL, _check, _parts
    from export.common import load_torch_parts, model_meta

    te, unet, vae = load_torch_parts(micro_model)
    mod, examples, ins, outs, shapes = _parts(te, unet, vae, model_meta(micro_model)["max_size"])["unet"]
    assert [e[0].shape[-1] for e in examples] == [16, 32] and [e[0].shape[0] for e in examples] == [2, 1]
    path = onnx_external[0] / "unet" / "model.onnx"
    assert _check(mod, examples, path, "unet", COMPONENT_ATOL["unet"]) < 1e-4
    # the timestep is a float input, used as a float: a fractional one (Euler, Karras sigmas) is not truncated
    import onnx

    from export.variants.onnx import _session, input_type

    assert examples[1][1].tolist() == [250.5]  # _check compared torch and ONNX there
    assert input_type(_session(path, "cpu"), "timestep") == np.float32
    graph = onnx.load(str(path), load_external_data=False).graph
    ints = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    assert not [n for n in graph.node if n.op_type == "Cast" and "timestep" in n.input
                and any(a.name == "to" and a.i in ints for a in n.attribute)]


def test_onnx_check_refuses_a_graph_that_does_not_take_every_size(tmp_path):
    """A graph exported with a fixed size (as an exporter may silently specialize one) is not kept."""
    from core.errors import UserError
    from export.variants.onnx import _check, _export

    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    _export(conv, (torch.randn(2, 4, 8, 8),), ["sample"], ["out"], None, tmp_path / "static.onnx")
    assert _check(conv, [(torch.randn(2, 4, 8, 8),)], tmp_path / "static.onnx", "conv", 1e-5) < 1e-5
    with pytest.raises(UserError, match=r"ONNX conv does not run on inputs \{'sample': \[1, 4, 16, 16\]\}"):
        _check(conv, [(torch.randn(2, 4, 8, 8),), (torch.randn(1, 4, 16, 16),)], tmp_path / "static.onnx", "conv", 1e-5)
    from export.variants.onnx import _session, input_type

    sess = _session(tmp_path / "static.onnx", "cpu")
    assert input_type(sess, "sample") == np.float32
    with pytest.raises(UserError, match="input 'timestep' is missing.*re-run `t2i export`"):
        input_type(sess, "timestep")


def test_generator_refuses_sizes_it_does_not_offer(micro_model):
    from core.errors import UserError
    from export.common import load_torch_parts, torch_generator

    gen = torch_generator(micro_model, *load_torch_parts(micro_model), torch.float32, "cpu")
    assert (gen.native_size, gen.min_size, gen.max_size, gen.size_factor) == (32, 16, 64, 8)
    for w, h in ((36, 32), (32, 72), (8, 8)):
        with pytest.raises(UserError, match="multiples of 8 from 16 to 64"):
            gen.generate([GenerationRequest("a red circle", num_inference_steps=1, width=w, height=h)])
    [[im]] = gen.generate([GenerationRequest("a red circle", num_inference_steps=1, width=64, height=48)])
    assert im.shape == (48, 64, 3)


@pytest.mark.slow
def test_bad_export_input(micro_model, tmp_path):
    res = run_cli("export", str(tmp_path / "missing"), "--out", str(tmp_path / "e"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("export", str(micro_model), "--out", str(tmp_path / "e"), "--variants", "eager-fp32,turbo-int3")
    assert res.returncode == 2 and "turbo-int3" in res.stderr and "onnx-fp32" in res.stderr
    assert not (tmp_path / "e").exists()
    res = run_cli("export", str(micro_model), "--out", str(tmp_path / "e2"), "--variants", "eager-bf16",
                  "--num-images", "4", "--repeats", "1", "--batch-sizes", "1", "--steps", "2",
                  "--max-fid-drift", "0", "--max-adherence-drop", "0")
    assert res.returncode == 2 and "no variant meets the budget" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_model_of_real_images_is_gated_on_its_own_data(micro_model, tmp_path):
    """export.references: the dataset's captions become the quality prompts and its images (any size,
    side-car captions) the FID references; free prompts without references are refused before anything
    is built."""
    from PIL import Image

    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(0)
    captions = [f"a photo of my {w}" for w in ("dog", "cat", "bike", "garden", "kitchen", "car")]
    for i, cap in enumerate(captions * 2):
        arr = rng.integers(0, 256, (30 + 7 * i, 48, 3), dtype=np.uint8)  # odd aspect ratios
        Image.fromarray(arr).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(cap)
    out = tmp_path / "e"
    res = run_cli("export", str(micro_model), "--out", str(out), "--variants", "eager-fp32,eager-bf16",
                  "--references.path", str(data), "--num-images", "6", "--repeats", "1", "--batch-sizes", "1",
                  "--steps", "2", "--max-fid-drift", "1000", "--max-adherence-drop", "0", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_manifest(out)
    assert m.config["references"]["path"] == str(data)
    for e in m.measured().values():
        assert e.quality.reference_images == 12 and e.quality.adherence is None
    assert m.selected is not None and "adherence not measured" in m.selection_reason
    bench = (out / "bench.md").read_text()
    assert "prompts: the references' captions" in bench and f"12 images of {data}" in bench
    assert "not measured" in bench
    free = tmp_path / "prompts.txt"
    free.write_text("a photo of my dog\na watercolour of a lighthouse\n")
    res = run_cli("export", str(micro_model), "--out", str(tmp_path / "e2"), "--prompts", str(free),
                  "--variants", "eager-fp32", "--num-images", "4")
    assert res.returncode == 2 and "export.references" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "e2").exists()


@pytest.mark.slow
def test_a_hung_benchmark_is_stopped_at_its_timeout(micro_model, tmp_path):
    res = run_cli("export", str(micro_model), "--out", str(tmp_path / "e"), "--variants", "eager-fp32",
                  "--num-images", "4", "--repeats", "1", "--batch-sizes", "1", "--steps", "2", "--bench-timeout-s", "0.5")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "benchmark did not finish within bench_timeout_s=0.5 s" in res.stderr


@pytest.mark.slow
def test_onnx_conversions_keep_weights_outside_the_protobuf(micro_model, onnx_external, tmp_path, monkeypatch):
    """An SD 1.x UNet (3.4 GB fp32) cannot live in one protobuf (2 GB): above EXTERNAL_DATA_MB the
    weights go to model.onnx.data and the fp16 / int8 conversions must work through paths. Forced
    here on the micro model: the fp32 export and the graphs converted from it keep their weights
    outside, the conversions leave no fp32 data behind, and the int8 one loads and draws what eager does."""
    import onnx

    from export.variants import onnx as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_MB", 0)
    fp32, notes = onnx_external
    ctx = {"built": {"onnx-fp32": fp32}, "notes": {"onnx-fp32": notes}}
    for precision in ("fp32", "int8", "fp16"):
        out = fp32 if precision == "fp32" else tmp_path / precision
        if precision != "fp32":  # as an export builds them: converted from the checked fp32 export
            assert ox.Onnx(precision).build(micro_model, out, "cpu", ctx)["exported_from"] == "onnx-fp32"
        for part in ("text_encoder", "unet"):
            path = out / part / "model.onnx"
            data = ox._data_files(path)
            assert data and {f.name for f in path.parent.glob("*.data")} == data, (precision, part)
            m = onnx.load(str(path), load_external_data=False)
            kinds = {t.data_type for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
            want = {"fp32": onnx.TensorProto.FLOAT, "int8": onnx.TensorProto.INT8,
                    "fp16": onnx.TensorProto.FLOAT16}[precision]
            assert want in kinds, (precision, part, kinds)
            onnx.checker.check_model(str(path))  # a valid graph (nodes in order), read by path as large ones are
    req = [GenerationRequest("a red circle", num_inference_steps=4, seed=1)]
    got = ox.Onnx("int8").load(tmp_path / "int8", "cpu").generate(req)[0][0].astype(int)
    ref = load_generator_images(micro_model, req)
    assert np.abs(got - ref).mean() <= ox.Onnx("int8").TOLERANCE


def load_generator_images(model, reqs):
    from core.sampling import load_generator

    return load_generator(str(model)).generate(reqs)[0][0].astype(int)


def test_an_export_into_the_same_dir_keeps_unchanged_folders_and_rebuilds_the_rest(micro_model, tmp_path, capsys,
                                                                                   monkeypatch):
    """A variant folder is kept when the build it records is the one the export would make now and its
    files are unchanged; a changed file, a stray file, a setting its build reads or rebuild=true builds
    it again. Folders the new export does not list go; an interrupted export's dir is an export dir."""
    import json
    from unittest.mock import ANY

    from core.errors import UserError
    from export import reuse
    from export.config import ExportConfig
    from export.export import build_variants, setup

    out = tmp_path / "export"
    cfg = ExportConfig(model=str(micro_model), out=str(out), variants=["eager-fp32", "eager-bf16"], num_images=8,
                       steps=2, batch_sizes=[1])

    def build(c=cfg, why=None):
        capsys.readouterr()
        entries = build_variants(setup(c), c)
        if why is not None:  # each folder that is built again says why
            rebuilt = sum(not e.reused for e in entries.values())
            assert capsys.readouterr().out.count(f"building it again ({why})") == rebuilt, why
        for n, e in entries.items():  # every folder's record lists exactly its files
            assert reuse.folder_digest(out / n) == json.loads((out / n / reuse.BUILD_FILE).read_text())["digest"]
        return {n: bool(e.reused) for n, e in entries.items()}

    out.mkdir()
    assert build() == {"eager-fp32": False, "eager-bf16": False}
    assert build() == {"eager-fp32": True, "eager-bf16": True}
    assert build(cfg.model_copy(update={"seed": 5, "num_images": 16})) == {"eager-fp32": True, "eager-bf16": True}
    weights = next((out / "eager-bf16" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte changed
    (out / "eager-fp32" / "notes.txt").write_text("a user's file")
    assert build(why="its files changed since it was built") == {"eager-fp32": False, "eager-bf16": False}
    assert not (out / "eager-fp32" / "notes.txt").exists()
    changed = cfg.model_copy(update={"batch_sizes": [1, 2]})
    assert build(changed, "changed since: settings its build reads") == {"eager-fp32": False, "eager-bf16": False}
    assert build(changed.model_copy(update={"rebuild": True}), "rebuild=true") == {"eager-fp32": False,
                                                                                    "eager-bf16": False}
    (out / "eager-bf16" / reuse.BUILD_FILE).write_text("{not json")
    assert build(changed, f"its {reuse.BUILD_FILE} is unreadable") == {"eager-fp32": True, "eager-bf16": False}
    # the model is its files wherever they are; one byte changed is another model
    import shutil

    copy = tmp_path / "model-copy"
    shutil.copytree(micro_model, copy)
    moved = changed.model_copy(update={"model": str(copy)})
    assert build(moved) == {"eager-fp32": True, "eager-bf16": True}
    weights = next((copy / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert build(moved, "changed since: the model's files") == {"eager-fp32": False, "eager-bf16": False}
    # a folder whose shipped code (an Inductor cache) this machine did not build is built again
    from core.io import sha256_file
    from export import trust

    code = out / "eager-bf16" / "cache.bin"
    code.write_bytes(b"compiled code")
    (out / "eager-bf16" / trust.CODE_MANIFEST).write_text(json.dumps(
        {"kind": "an Inductor cache", "files": {"cache.bin": {"sha256": sha256_file(code)}}}))
    rec = json.loads((out / "eager-bf16" / reuse.BUILD_FILE).read_text())
    reuse.record(out / "eager-bf16", rec["made_from"], rec["build_s"], rec["notes"])  # its files, as recorded
    assert build(moved, "the code it ships was not built on this machine") == {"eager-fp32": True,
                                                                              "eager-bf16": False}
    # int8-static calibrates on prompts drawn with the gate's seed; a conversion depends on its source
    common = reuse.common_inputs(micro_model, "cpu")
    ctx = {"batch_sizes": [1], "calibration_prompts": ["a red circle"], "steps": 4, "guidance": 5.0,
           "keys": {"onnx-fp32": "a"}}
    other = {**ctx, "calibration_prompts": ["a blue square"], "keys": {"onnx-fp32": "b"}}
    for name, same in (("eager-fp32", True), ("onnx-fp32", True), ("int8-static", False), ("onnx-int8", False),
                       ("onnx-int8+trunc0.5", False), ("eager-fp32+cache2", True)):
        assert (reuse.made_from(common, name, ctx) == reuse.made_from(common, name, other)) == same, name
    for gpu in ("NVIDIA H100", "NVIDIA L4"):  # a GPU build is keyed by the GPU it was made for
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, gpu=gpu: gpu)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        assert reuse.common_inputs(micro_model, "cuda")["device"] == f"cuda: {gpu} (sm 9.0)"
    monkeypatch.undo()
    # a package compiled for another CPU (a trust store shared over NFS): not kept, since loading refuses it
    from export.variants.int8_static import PACKAGE, TARGET, cpu_flags

    static = tmp_path / "elsewhere" / "int8-static"
    static.mkdir(parents=True)
    (static / PACKAGE).write_bytes(b"compiled elsewhere")
    inputs = reuse.made_from(common, "int8-static", ctx)
    for flags, kept in ((sorted(cpu_flags() or []), True), (["sse2", "avx512_zz"], False)):
        (static / TARGET).write_text(json.dumps({"torch": torch.__version__, "cpu_flags": flags}))
        reuse.record(static, inputs, 1.0, {})
        assert reuse.reusable(static, inputs) == (({"build_s": 1.0, "notes": {}, "built": ANY}, None) if kept else
                                                  (None, "it was compiled for another CPU or torch"))

    (out / "mine").mkdir()  # not a variant folder: left alone, as is a user's copy of one
    shutil.copytree(out / "eager-bf16", out / "eager-bf16.bak")
    assert reuse.remove_stale(out, {"eager-fp32"}) == ["eager-bf16"]
    assert (out / "mine").is_dir() and (out / "eager-bf16.bak").is_dir()
    assert not (out / "export.json").exists()
    setup(cfg)  # variant folders without a manifest: an interrupted export, resumed
    killed = tmp_path / "killed"  # killed while building its first variant
    (killed / "eager-fp32.tmp").mkdir(parents=True)
    setup(cfg.model_copy(update={"out": str(killed)}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine").mkdir()
    with pytest.raises(UserError, match="not an export dir"):
        setup(cfg.model_copy(update={"out": str(tmp_path / "other")}))


@pytest.mark.slow
def test_int8_static_leaves_inductor_global_config_as_it_found_it(tmp_path):
    """Inductor keys its cache on its global config. torchao's x86 quantizer import installed a pre-grad
    pass there and AOTInductor's packaging wrote its target there, so a compile variant built in the same
    export as int8-static shipped a cache that no fresh process could hit (a cold compile at every start)."""
    import torch._inductor.config as inductor_config

    from export.variants.int8_static import PACKAGE, _Quantized, inductor_options, package

    before = inductor_config.get_config_copy()
    assert inductor_options()["pre_grad_custom_pass"] is not None  # int8-static's own compile still gets it

    class Tiny(torch.nn.Module):  # the UNet's signature: (latents, per-row timesteps, text states)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)

        def forward(self, sample, t, emb):
            return self.conv(sample) + (t[:, None] + emb.mean((1, 2))[:, None])[:, :, None, None]

    example = (torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 3, 5))
    graph = Tiny().eval()
    package(_Quantized(graph, None), example, tmp_path / PACKAGE)
    after = inductor_config.get_config_copy()
    assert {k: (v, after[k]) for k, v in before.items() if after[k] != v} == {}
    runner = torch._inductor.aoti_load_package(str(tmp_path / PACKAGE))
    x = (torch.randn(3, 4, 6, 6), torch.tensor([1.0, 2.0, 3.0]), torch.randn(3, 3, 5))  # other rows and size
    with torch.no_grad():
        assert torch.allclose(runner(*x), graph(*x), atol=1e-5)
