"""Calling the service from an app: BentoML's client, the ``openai`` SDK, or plain HTTP (curl).

    python -m serving.client http://localhost:3000 "a red circle on the left" --out circle.png

The same three ways, as shell and Python, are in the README. A server started with an API key wants
it as ``Authorization: Bearer KEY``: pass ``api_key`` (or set T2I_API_KEY for this client).
"""
from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

CURL_EXAMPLE = """curl -s -X POST {url}/generate -H 'Content-Type: application/json' \\
  -d '{{"prompt": "a red circle on the left", "seed": 1}}' -o circle.png"""


def generate_bentoml(url: str, prompt: str, api_key: str | None = None, **fields) -> bytes:
    """PNG bytes from ``POST /generate`` through ``bentoml.SyncHTTPClient``."""
    import bentoml

    with bentoml.SyncHTTPClient(url, token=api_key or os.environ.get("T2I_API_KEY")) as client:
        out = client.generate(prompt=prompt, **fields)
    if isinstance(out, (str, Path)):  # the client saves binary responses to a file
        return Path(out).read_bytes()
    if isinstance(out, bytes):
        return out
    import io

    buf = io.BytesIO()
    out.save(buf, format="PNG")  # a PIL image
    return buf.getvalue()


def generate_openai(url: str, prompt: str, n: int = 1, size: str | None = None, api_key: str | None = None,
                    **extra) -> list[bytes]:
    """PNG bytes from the OpenAI Images API shape, through the ``openai`` SDK (``base_url``)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key or os.environ.get("T2I_API_KEY") or "unused")
    kwargs = {"size": size} if size else {}
    res = client.images.generate(prompt=prompt, n=n, response_format="b64_json", extra_body=extra or None, **kwargs)
    return [base64.b64decode(d.b64_json) for d in res.data]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate an image with a running t2i service.")
    p.add_argument("url", help="service address, e.g. http://localhost:3000")
    p.add_argument("prompt")
    p.add_argument("--out", default="out.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--via", choices=["bentoml", "openai"], default="bentoml", help="which client to use")
    a = p.parse_args(argv)
    if a.via == "openai":
        png = generate_openai(a.url, a.prompt, seed=a.seed, num_inference_steps=a.steps)[0]
    else:
        png = generate_bentoml(a.url, a.prompt, seed=a.seed, num_inference_steps=a.steps)
    Path(a.out).write_bytes(png)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
