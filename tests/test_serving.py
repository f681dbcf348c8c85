"""The BentoML service, for real: `t2i serve` (a `bentoml serve` process) on a free port of 127.0.0.1,
called over HTTP by curl-like posts, BentoML's client and the openai SDK; and `t2i bento`."""
from __future__ import annotations

import concurrent.futures as cf
import io
import socket
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from export.manifest import read_manifest
from tests.conftest import run_cli, start_server, stop_server

pytestmark = pytest.mark.slow  # runs the CLI / a server / training in subprocesses

MAX_CONCURRENCY = 8  # the `server` fixture's: images in flight, two per guided image


def _png(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB")).astype(np.int16)


def _raw(server, request: bytes, timeout: float = 30) -> bytes:
    """Sends raw bytes to the server and returns what it answers (for requests httpx will not make)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and len(data) > data.index(b"\r\n\r\n") + 4:
                break
        return data


def test_ready_health_and_info(server, served_export):
    for path in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200, path  # probes need no key
    r = server.get("/info")
    info = r.json()
    assert info["variant"] == "eager-fp32" and "32x32" in info["sizes"] and "64x64" in info["sizes"]
    assert info["size_range"] == {"min": 16, "max": 64, "multiple_of": 8}
    assert info["limits"]["max_batch_size"] == 8 and "latency" in info["bench"]
    assert str(served_export) not in r.text and "/tmp" not in r.text and "export_dir" not in info  # no paths
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_readyz_answered_503_at_once_while_the_model_loaded(server):
    """While the model loaded, every probe that reached the API got an answer within its 2 s timeout:
    503 until ready, then 200 (BentoML's own /readyz hung until the model was ready)."""
    answered = [code for _, code in server.probes if code != "no connection"]
    assert answered[-1] == 200 and 503 in answered, server.probes
    assert "timeout" not in answered[answered.index(503):], server.probes


def test_generate_returns_png_deterministic_per_seed(mode_server):
    a = mode_server.post("/generate", {"prompt": "a red circle on the left", "seed": 5, "num_inference_steps": 3})
    assert a.status_code == 200 and a.headers["content-type"] == "image/png"
    assert a.headers["x-prompt-truncated"] == "false"
    img = _png(a.content)
    assert img.shape == (32, 32, 3)
    b = mode_server.post("/generate", {"prompt": "a red circle on the left", "seed": 5, "num_inference_steps": 3})
    c = mode_server.post("/generate", {"prompt": "a red circle on the left", "seed": 6, "num_inference_steps": 3})
    assert np.abs(_png(b.content) - img).max() <= 1
    assert np.abs(_png(c.content) - img).mean() > 1  # another seed, another image
    two = mode_server.post("/generate", {"prompt": "a red circle", "num_images": 2, "num_inference_steps": 2})
    assert _png(two.content).shape == (32, 64, 3) and two.headers["x-num-images"] == "2"


def test_openai_sdk_and_bentoml_client(server):
    from serving.client import generate_bentoml, generate_openai

    pngs = generate_openai(server.url, "a blue square at the top", n=2, size="32x32", seed=3, num_inference_steps=3,
                           api_key=server.key)
    assert len(pngs) == 2 and all(_png(p).shape == (32, 32, 3) for p in pngs)
    assert np.abs(_png(pngs[0]) - _png(pngs[1])).mean() > 1  # n images get seeds seed, seed+1
    same = generate_bentoml(server.url, "a blue square at the top", seed=3, num_inference_steps=3, api_key=server.key)
    assert np.abs(_png(same) - _png(pngs[0])).max() <= 1


def test_api_key_is_required_in_openai_error_shape(server):
    import openai

    from serving.client import generate_openai

    body = {"prompt": "a red circle", "num_inference_steps": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.key},
                    {"Authorization": f"Basic {server.key}"}):
        for path in ("/generate", "/v1/images/generations"):
            r = httpx.post(server.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and "message" in err
        assert httpx.get(server.url + "/info", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):  # the SDK reads the shape as its own error
        generate_openai(server.url, "a red circle", api_key="wrong")
    assert server.post("/generate", body).status_code == 200


def test_serves_native_double_and_non_square_sizes(server):
    from serving.client import generate_openai

    for size, shape in (("32x32", (32, 32, 3)), ("64x64", (64, 64, 3)), ("64x32", (32, 64, 3))):
        [png] = generate_openai(server.url, "a red circle on the left", n=1, size=size, seed=2, num_inference_steps=2,
                                api_key=server.key)
        assert _png(png).shape == shape, size
    r = server.post("/generate", {"prompt": "a red circle", "width": 64, "height": 48, "num_inference_steps": 2})
    assert r.status_code == 200 and _png(r.content).shape == (48, 64, 3)


def test_long_prompt_is_truncated_and_says_so(server):
    long = " ".join(["a red circle on the left"] * 30)  # ~180 tokens, under the 1000-char limit
    r = server.post("/generate", {"prompt": long, "num_inference_steps": 2})
    assert r.status_code == 200 and r.headers["x-prompt-truncated"] == "true"
    o = server.post("/v1/images/generations", {"prompt": long, "num_inference_steps": 2}).json()
    revised = o["data"][0]["revised_prompt"]
    assert revised and len(revised) < len(long) and long.startswith(revised.split(" left")[0])


def test_burst_is_batched_and_mixed_steps_come_back_right(mode_server):
    reqs = [{"prompt": f"a {c} circle", "seed": i, "num_inference_steps": (2, 4)[i % 2], "guidance_scale": 1.0}
            for i, c in enumerate(["red", "blue", "green", "yellow", "cyan", "brown"])]  # unguided: 1 row each
    before = mode_server.get("/info").json()["batches_run"]
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        burst = list(ex.map(lambda r: mode_server.post("/generate", r), reqs))
    assert [r.status_code for r in burst] == [200] * len(reqs)
    after = mode_server.get("/info").json()["batches_run"]
    grew = {int(k) for k in after if after[k] > before.get(k, 0)}
    assert max(grew) > 1 if mode_server.mode != "off" else grew == {1}, after  # several requests shared a UNet call
    if mode_server.mode == "step":  # the running set's size per step, as Prometheus sees it
        metrics = httpx.get(mode_server.url + "/metrics").text
        over_one = [line for line in metrics.splitlines() if line.startswith("t2i_engine_step_rows_bucket")
                    and 'le="1.0"' in line]
        total = [line for line in metrics.splitlines() if line.startswith("t2i_engine_step_rows_count")]
        assert over_one and total and float(total[0].split()[-1]) > float(over_one[0].split()[-1]), metrics[-2000:]
        assert "t2i_engine_time_to_first_step_seconds_count" in metrics and "t2i_engine_queue_rows" in metrics
    for r, got in zip(reqs, burst):  # each answer is its own request's image, whatever it was batched with
        alone = mode_server.post("/generate", r)
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
    ("/v1/images/generations", {"prompt": "a red circle", "size": "9" * 5000 + "x32"}, "size"),
    ("/v1/images/generations", {"prompt": "a red circle", "size": "\uff13\uff12x\uff13\uff12"}, "size"),  # ３２x３２
    ("/v1/images/generations", {"prompt": "a red circle", "response_format": "url"}, "response_format"),
])
def test_bad_request_is_400_naming_the_field(server, path, body, field):
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(field in loc for loc in locs), r.text
    assert server.post("/generate", {"prompt": "still serving", "num_inference_steps": 1}).status_code == 200


def test_only_json_bodies_of_bounded_size_are_read(server):
    ok = b'{"prompt": "a red circle", "num_inference_steps": 1}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  "multipart/form-data; boundary=x", None):
        headers = {**server.auth, **({"Content-Type": ctype} if ctype else {})}
        r = httpx.post(server.url + "/generate", content=ok, headers=headers, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (ctype, r.text)
    big = b'{"prompt": "' + b"a" * 70_000 + b'"}'
    r = httpx.post(server.url + "/generate", content=big, headers={**server.auth, "Content-Type": "application/json"})
    assert r.status_code == 413
    chunked = httpx.post(server.url + "/generate", content=iter([big[:40_000], big[40_000:]]),  # no Content-Length
                         headers={**server.auth, "Content-Type": "application/json"}, timeout=30)
    assert chunked.status_code == 413
    for bad in (b"{bad", b"[1, 2]", b'{"prompt": "a", "num_inference_steps": 1' + b"9" * 5000 + b"}", b"\xff\xfe"):
        r = httpx.post(server.url + "/generate", content=bad, headers={**server.auth, "Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 400, (bad[:20], r.text)


def test_a_stalled_body_gets_408_and_holds_no_slot(server):
    """Clients that send headers and stall their body are cut off after the 2 s body timeout, and a
    real client is served meanwhile."""
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"").encode()
    with cf.ThreadPoolExecutor(MAX_CONCURRENCY + 1) as ex:
        t0 = time.monotonic()
        stalled = [ex.submit(_raw, server, head) for _ in range(MAX_CONCURRENCY)]
        time.sleep(0.5)
        real = server.post("/generate", {"prompt": "a red circle", "num_inference_steps": 1})
        answers = [f.result() for f in stalled]
    assert real.status_code == 200
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
    assert time.monotonic() - t0 < 15


def test_abandoned_requests_are_cancelled_and_free_their_slots(mode_server):
    """Clients that post a long request and leave: their work stops, and a real client is served in
    less than the time one of those requests takes (it got 429s before)."""
    slow = {"prompt": "a red circle", "num_inference_steps": 100}
    t0 = time.monotonic()
    assert mode_server.post("/generate", slow).status_code == 200
    one_request_s = time.monotonic() - t0
    body = httpx.Request("POST", "/generate", json=slow).content
    req = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mode_server.key}\r\nContent-Type: "
           f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    host, port = mode_server.url.removeprefix("http://").split(":")
    clients = [socket.create_connection((host, int(port))) for _ in range(8)]
    for c in clients:  # they post, wait until the server has taken their work on, and leave
        c.sendall(req)
    # polled, not slept: a slow spell of the host during the first request once made a sleep of a third
    # of it outlast the abandoned requests themselves, and nothing was left to cancel
    deadline = time.monotonic() + max(10.0, one_request_s)
    while mode_server.get("/info").json()["images_in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    for c in clients:
        c.close()
    time.sleep(0.3)
    t0 = time.monotonic()
    real = mode_server.post("/generate", {"prompt": "a blue square", "num_inference_steps": 2})
    waited = time.monotonic() - t0
    assert real.status_code == 200, real.text
    assert waited < one_request_s, (waited, one_request_s)
    assert mode_server.get("/info").json()["images_in_flight"] == 0
    assert "client left before its answer: /generate cancelled" in mode_server.log.read_text()


def test_concurrency_counts_images_with_their_guidance(mode_server):
    """max_concurrency 8: two requests of 4 unguided images fit together, two of 4 guided ones do not."""
    def pair(guidance: float) -> list[int]:
        body = {"prompt": "a red circle", "num_images": 4, "num_inference_steps": 30, "guidance_scale": guidance}
        with cf.ThreadPoolExecutor(2) as ex:
            return sorted(r.status_code for r in ex.map(lambda _: mode_server.post("/generate", body), range(2)))

    assert pair(1.0) == [200, 200]
    assert pair(5.0) == [200, 429]


def test_overload_gets_429_never_a_hang(mode_server):
    n = MAX_CONCURRENCY * 3
    with cf.ThreadPoolExecutor(n) as ex:
        res = list(ex.map(lambda i: mode_server.post("/generate", {"prompt": "a red circle", "seed": i,
                                                               "num_inference_steps": 30}), range(n)))
    codes = [r.status_code for r in res]
    assert set(codes) <= {200, 429, 503} and 429 in codes and 200 in codes, codes
    assert all(_png(r.content).shape == (32, 32, 3) for r in res if r.status_code == 200)


def test_client_errors_are_logged_as_one_line(server):
    server.post("/generate", {"prompt": "", "num_inference_steps": 1})
    httpx.post(server.url + "/generate", content=b"x", headers={"Content-Type": "text/plain"})
    time.sleep(0.5)
    log = server.log.read_text()
    assert "Traceback" not in log and "validation error" in log and " 415 on /generate" in log


def test_sigterm_mid_request_stops_every_process(served_export, tmp_path):
    """SIGTERM to `t2i serve` while a request runs: in-flight work finishes or is cut off within the
    stated 10 s grace, and no process of the server is left."""
    srv = start_server(served_export, tmp_path / "serve.log", "--no-warmup")
    procs = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
    assert len(procs) >= 3  # t2i serve, the BentoML arbiter, its workers
    with cf.ThreadPoolExecutor(1) as ex:
        pending = ex.submit(srv.post, "/generate", {"prompt": "a red circle", "num_inference_steps": 100}, 60)
        time.sleep(1.0)
        t0 = time.monotonic()
        stop_server(srv, timeout=30)
        stopped_s = time.monotonic() - t0
        try:
            code = pending.result().status_code
        except httpx.HTTPError:
            code = "cut off"
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    assert stopped_s < 15 and code in (200, 503, "cut off"), (stopped_s, code)


def test_serve_missing_export_dir_is_a_clear_error(tmp_path):
    res = run_cli("serve", str(tmp_path / "nope"))
    assert res.returncode == 2 and "no export.json" in res.stderr and "Traceback" not in res.stderr


def test_serve_unreadable_key_file_is_a_clear_error(served_export, tmp_path):
    res = run_cli("serve", str(served_export), "--api-key-file", str(tmp_path / "none"))
    assert res.returncode == 2 and "API key file" in res.stderr and "Traceback" not in res.stderr


def test_bento_builds_with_the_artifact(served_export, tmp_path):
    res = run_cli("bento", str(served_export), env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert res.returncode == 0, res.stderr[-2000:]
    tag = res.stdout.split("built Bento ")[1].split()[0]
    name, version = tag.split(":")
    src = tmp_path / "bentoml" / "bentos" / name / version / "src"
    manifest = read_manifest(src / "artifact")
    assert manifest.selected == "eager-fp32" and list(manifest.variants) == ["eager-fp32"]
    assert manifest.bundled_from == str(served_export.resolve())
    assert (src / "artifact" / "eager-fp32" / "unet").is_dir()
    assert (src / "serving" / "service.py").is_file() and (src / "export" / "loader.py").is_file()
    assert (tmp_path / "bentoml" / "bentos" / name / version / "env" / "docker" / "Dockerfile").is_file()
    res = run_cli("bento", str(served_export), "--variant", "onnx-int8", env={"BENTOML_HOME": str(tmp_path / "b2")})
    assert res.returncode == 2 and "onnx-int8" in res.stderr
