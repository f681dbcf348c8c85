"""Property-based fuzzing of a running t2i server's HTTP API with hypothesis, driven by the service's
own OpenAPI schema (``/docs.json``; ``from_schema`` turns its request bodies into strategies): bodies
that follow the schema,
bodies with one field broken, arbitrary JSON, arbitrary bytes, other content types, and missing or
wrong API keys. The property: no answer is a 5xx, every 200 is a valid PNG (or OpenAI JSON of PNGs),
and afterwards the server still answers a valid request with a valid PNG.

    python benchmarks/fuzz_api.py http://127.0.0.1:3000 --cases 500 [--api-key KEY]

Only a local server is fuzzed (127.0.0.1 / localhost). Schema-following bodies always set the steps,
capped at 3, and at most 2 images, so that a case costs a fraction of a second of compute.
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
from benchmarks.server import valid_png  # noqa: E402

CHEAP = {"num_inference_steps": 3, "num_images": 2, "n": 2}  # caps on the schema's maxima for valid bodies


def _ok_body(path: str, resp: httpx.Response) -> bool:
    if path == "/generate":
        return resp.headers.get("content-type") == "image/png" and valid_png(resp.content)
    try:
        return all(valid_png(base64.b64decode(d["b64_json"])) for d in resp.json()["data"])
    except (ValueError, KeyError, TypeError):
        return False


def request_schemas(schema: dict) -> dict[str, dict]:
    """POST path -> its JSON request-body schema, with the costly maxima capped (see CHEAP)."""
    out = {}
    for path, ops in schema["paths"].items():
        body = ops.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {})
        if "schema" in body and path in ("/generate", "/v1/images/generations"):
            s = copy.deepcopy(body["schema"])
            for name, cap in CHEAP.items():
                if name in s.get("properties", {}):
                    s["properties"][name]["maximum"] = min(cap, s["properties"][name].get("maximum", cap))
            s["required"] = sorted({*s.get("required", []), "num_inference_steps"})  # not the default 20
            out[path] = s
    return out


def from_schema(schema: dict):
    """Values that follow a JSON schema of the kinds pydantic writes for request bodies: objects with
    required and optional properties, strings with length bounds, bounded integers and numbers,
    booleans, null, const, enum and anyOf."""
    from hypothesis import strategies as st

    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 200), 200))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v) for k, v in props.items() if k not in required})
    raise ValueError(f"schema kind {kind!r} is not one this fuzzer generates")


def case_strategy(schemas: dict[str, dict], api_key: str | None):
    """Strategy of (path, headers, body bytes, kind)."""
    from hypothesis import strategies as st

    paths = sorted(schemas)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    json_ct = {"Content-Type": "application/json", **auth}
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30, max_value=10**60)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50)
               | st.from_regex(r"[0-9]{1,8}x[0-9]{1,8}", fullmatch=True) | st.just("\uff16\uff14x\uff16\uff14"))
    any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)

    def valid(path):
        return from_schema(schemas[path]).map(lambda b: (path, json_ct, json.dumps(b).encode(), "valid"))

    def broken(path):
        names = sorted(schemas[path]["properties"])
        return st.tuples(from_schema(schemas[path]), st.sampled_from(names + ["unknown_field"]), any_json).map(
            lambda t: (path, json_ct, json.dumps({**t[0], t[1]: t[2]}).encode(), "broken field"))

    anything = st.tuples(st.sampled_from(paths), any_json).map(
        lambda t: (t[0], json_ct, json.dumps(t[1]).encode(), "any json"))
    raw = st.tuples(st.sampled_from(paths), st.binary(max_size=300)).map(lambda t: (t[0], json_ct, t[1], "bytes"))
    ctypes = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "multipart/form-data; boundary=",
              "application/json; charset=latin-1", "APPLICATION/JSON", "", "application/octet-stream"]
    ctype = st.tuples(st.sampled_from(paths), st.sampled_from(ctypes), st.binary(max_size=80)).map(
        lambda t: (t[0], {"Content-Type": t[1], **auth}, t[2], "content type"))
    keys = st.tuples(st.sampled_from(paths), st.sampled_from(
        [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"},
         {"Authorization": "bearer " + (api_key or "")}])).map(
        lambda t: (t[0], {"Content-Type": "application/json", **t[1]}, b'{"prompt": "a red circle", '
                   b'"num_inference_steps": 1}', "api key"))
    kinds = [*(valid(p) for p in paths), *(broken(p) for p in paths), anything, raw, ctype]
    if api_key:
        kinds.append(keys)
    return st.one_of(kinds)


def fuzz(url: str, api_key: str | None = None, cases: int = 300, seed: int = 0, timeout: float = 120) -> dict:
    """Runs ``cases`` fuzz cases against the server at ``url``; returns counts and any failures."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed

    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("fuzz only a local server (127.0.0.1)")
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schemas = request_schemas(httpx.get(url + "/docs.json", timeout=30).json())
    status: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    failures: list[dict] = []
    client = httpx.Client(timeout=timeout)
    t0 = time.monotonic()

    @fix_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(schemas, api_key))
    def one(case):
        path, headers, body, kind = case
        by_kind[kind] += 1
        try:
            r = client.post(url + path, content=body, headers=headers)
        except httpx.HTTPError as e:
            status[f"error:{type(e).__name__}"] += 1
            failures.append({"kind": kind, "path": path, "error": type(e).__name__,
                             "body": body[:200].decode("latin-1")})
            return
        status[str(r.status_code)] += 1
        if r.status_code >= 500 or (r.status_code == 200 and not _ok_body(path, r)):
            failures.append({"kind": kind, "path": path, "status": r.status_code, "answer": r.text[:200],
                             "body": body[:200].decode("latin-1")})

    one()
    wall = time.monotonic() - t0
    after = client.post(url + "/generate", json={"prompt": "a red circle", "num_inference_steps": 2}, headers=auth)
    client.close()
    return {"cases": sum(by_kind.values()), "wall_s": round(wall, 1), "by_kind": dict(by_kind),
            "status": dict(sorted(status.items())), "5xx": sum(v for k, v in status.items() if k.startswith("5")),
            "transport_errors": sum(v for k, v in status.items() if k.startswith("error")),
            "invalid_200": sum(1 for f in failures if f.get("status") == 200),
            "valid_request_after": after.status_code == 200 and valid_png(after.content), "failures": failures[:20]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    res = fuzz(a.url, a.api_key, a.cases, a.seed)
    print(json.dumps(res, indent=2))
    sys.exit(0 if not res["failures"] and res["valid_request_after"] else 1)


if __name__ == "__main__":
    main()
