"""The BentoML service, for real: `t2i serve` (a `bentoml serve` process) on a free port, called
over HTTP by curl-like posts, BentoML's client and the openai SDK; and `t2i bento`."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from export.manifest import read_manifest
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # runs the CLI / a server / training in subprocesses

MAX_CONCURRENCY = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def export_dir(micro_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "exp"
    res = run_cli("export", str(micro_model), "--out", str(out), "--variants", "eager-fp32,onnx-fp32",
                  "--num-images", "4", "--repeats", "1", "--batch-sizes", "1", "--steps", "2", "--select", "eager-fp32")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml"))}
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(export_dir), "--host", "127.0.0.1",
                                 "--port", str(port), "--variant", "onnx-fp32",  # dynamic sizes: the harder case
                                 "--max-batch-size", "8", "--max-latency-ms", "60000",
                                 "--max-concurrency", str(MAX_CONCURRENCY)], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("server not ready in 240 s:\n" + log.read_text()[-3000:])
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def post(url, path, body, timeout=120):
    return httpx.post(url + path, json=body, timeout=timeout)


def test_ready_health_and_info(server):
    for path in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(server + path).status_code == 200, path
    info = httpx.get(server + "/info").json()
    assert info["variant"] == "onnx-fp32" and info["native_size"] == 32
    assert info["sizes"] == ["16x16", "24x24", "32x32", "40x40", "48x48", "56x56", "64x64"]
    assert info["size_range"] == {"min": 16, "max": 64, "multiple_of": 8}
    assert info["limits"]["max_batch_size"] == 8 and "latency" in info["bench"]
    assert httpx.get(server + "/metrics").status_code == 200


def test_generate_returns_png_deterministic_per_seed(server):
    a = post(server, "/generate", {"prompt": "a red circle on the left", "seed": 5, "num_inference_steps": 3})
    assert a.status_code == 200 and a.headers["content-type"] == "image/png"
    assert a.headers["x-prompt-truncated"] == "false"
    img = _png(a.content)
    assert img.shape == (32, 32, 3)
    b = post(server, "/generate", {"prompt": "a red circle on the left", "seed": 5, "num_inference_steps": 3})
    c = post(server, "/generate", {"prompt": "a red circle on the left", "seed": 6, "num_inference_steps": 3})
    assert np.abs(_png(b.content) - img).max() <= 1
    assert np.abs(_png(c.content) - img).mean() > 1  # another seed, another image
    two = post(server, "/generate", {"prompt": "a red circle", "num_images": 2, "num_inference_steps": 2})
    assert _png(two.content).shape == (32, 64, 3) and two.headers["x-num-images"] == "2"


def test_openai_sdk_and_bentoml_client(server):
    from serving.client import generate_bentoml, generate_openai

    pngs = generate_openai(server, "a blue square at the top", n=2, size="32x32", seed=3, num_inference_steps=3)
    assert len(pngs) == 2 and all(_png(p).shape == (32, 32, 3) for p in pngs)
    assert np.abs(_png(pngs[0]) - _png(pngs[1])).mean() > 1  # n images get seeds seed, seed+1
    same = generate_bentoml(server, "a blue square at the top", seed=3, num_inference_steps=3)
    assert np.abs(_png(same) - _png(pngs[0])).max() <= 1


def test_onnx_variant_serves_native_double_and_non_square_sizes(server):
    from serving.client import generate_openai

    for size, shape in (("32x32", (32, 32, 3)), ("64x64", (64, 64, 3)), ("64x32", (32, 64, 3))):
        [png] = generate_openai(server, "a red circle on the left", n=1, size=size, seed=2, num_inference_steps=2)
        assert _png(png).shape == shape, size
    r = post(server, "/generate", {"prompt": "a red circle", "width": 64, "height": 48, "num_inference_steps": 2})
    assert r.status_code == 200 and _png(r.content).shape == (48, 64, 3)


def test_long_prompt_is_truncated_and_says_so(server):
    long = " ".join(["a red circle on the left"] * 30)  # ~180 tokens, under the 1000-char limit
    r = post(server, "/generate", {"prompt": long, "num_inference_steps": 2})
    assert r.status_code == 200 and r.headers["x-prompt-truncated"] == "true"
    o = post(server, "/v1/images/generations", {"prompt": long, "num_inference_steps": 2}).json()
    revised = o["data"][0]["revised_prompt"]
    assert revised and len(revised) < len(long) and long.startswith(revised.split(" left")[0])


def test_burst_is_batched_and_mixed_steps_come_back_right(server):
    reqs = [{"prompt": f"a {c} circle", "seed": i, "num_inference_steps": (2, 4)[i % 2]}
            for i, c in enumerate(["red", "blue", "green", "yellow", "cyan", "brown"])]
    before = httpx.get(server + "/info").json()["batches_run"]
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        burst = list(ex.map(lambda r: post(server, "/generate", r), reqs))
    assert [r.status_code for r in burst] == [200] * len(reqs)
    after = httpx.get(server + "/info").json()["batches_run"]
    grew = {int(k) for k in after if after[k] > before.get(k, 0)}
    assert max(grew) > 1, after  # several requests shared one batch
    for r, got in zip(reqs, burst):  # each answer is its own request's image, whatever it was batched with
        alone = post(server, "/generate", r)
        assert np.abs(_png(got.content) - _png(alone.content)).mean() < 1.0, r


@pytest.mark.parametrize("path,body,field", [
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate", {"prompt": "   "}, "prompt"),
    ("/generate", {"prompt": "x" * 1001}, "prompt"),
    ("/generate", {"prompt": "a red circle", "num_inference_steps": 0}, "num_inference_steps"),
    ("/generate", {"prompt": "a red circle", "num_inference_steps": 101}, "num_inference_steps"),
    ("/generate", {"prompt": "a red circle", "num_inference_steps": "many"}, "num_inference_steps"),
    ("/generate", {"prompt": "a red circle", "guidance_scale": 31}, "guidance_scale"),
    ("/generate", {"prompt": "a red circle", "guidance_scale": -1}, "guidance_scale"),
    ("/generate", {"prompt": "a red circle", "width": 36}, "width"),
    ("/generate", {"prompt": "a red circle", "height": 72}, "height"),
    ("/generate", {"prompt": "a red circle", "num_images": 5}, "num_images"),
    ("/generate", {"prompt": "a red circle", "seed": -1}, "seed"),
    ("/generate", {"num_inference_steps": 4}, "prompt"),
    ("/v1/images/generations", {"prompt": "a red circle", "n": 0}, "n"),
    ("/v1/images/generations", {"prompt": "a red circle", "n": 5}, "n"),
    ("/v1/images/generations", {"prompt": "a red circle", "size": "72x72"}, "size"),
    ("/v1/images/generations", {"prompt": "a red circle", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "a red circle", "response_format": "url"}, "response_format"),
])
def test_bad_request_is_400_naming_the_field(server, path, body, field):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(field in loc for loc in locs), r.text
    assert post(server, "/generate", {"prompt": "still serving", "num_inference_steps": 1}).status_code == 200


def test_overload_gets_429_never_a_hang(server):
    n = MAX_CONCURRENCY * 3
    with cf.ThreadPoolExecutor(n) as ex:
        res = list(ex.map(lambda i: post(server, "/generate", {"prompt": "a red circle", "seed": i,
                                                                "num_inference_steps": 30}), range(n)))
    codes = [r.status_code for r in res]
    assert set(codes) <= {200, 429, 503} and 429 in codes and 200 in codes, codes
    assert all(_png(r.content).shape == (32, 32, 3) for r in res if r.status_code == 200)


def test_serve_missing_export_dir_is_a_clear_error(tmp_path):
    res = run_cli("serve", str(tmp_path / "nope"))
    assert res.returncode == 2 and "no export.json" in res.stderr and "Traceback" not in res.stderr


def test_bento_builds_with_the_artifact(export_dir, tmp_path):
    res = run_cli("bento", str(export_dir), env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert res.returncode == 0, res.stderr[-2000:]
    tag = res.stdout.split("built Bento ")[1].split()[0]
    name, version = tag.split(":")
    src = tmp_path / "bentoml" / "bentos" / name / version / "src"
    manifest = read_manifest(src / "artifact")
    assert manifest.selected == "eager-fp32" and list(manifest.variants) == ["eager-fp32"]
    assert manifest.bundled_from == str(export_dir.resolve())
    assert (src / "artifact" / "eager-fp32" / "unet").is_dir()
    assert (src / "serving" / "service.py").is_file() and (src / "export" / "loader.py").is_file()
    assert (tmp_path / "bentoml" / "bentos" / name / version / "env" / "docker" / "Dockerfile").is_file()
    res = run_cli("bento", str(export_dir), "--variant", "onnx-int8", env={"BENTOML_HOME": str(tmp_path / "b2")})
    assert res.returncode == 2 and "onnx-int8" in res.stderr
