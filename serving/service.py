"""The BentoML services: ``ImageModel`` (loads the export dir's variant, batches requests) and
``ImageAPI`` in front of it (validation, ``/generate``, OpenAI's ``/v1/images/generations``, ``/info``).

    bentoml serve serving.service:ImageAPI          # or: t2i serve EXPORT_DIR

BentoML batches one list parameter, while diffusion requests differ in steps, size and guidance:
the batcher here collects whole requests, and the export engine groups the ones that can share a
batch (same steps and size) and runs each group once, with per-request seed and guidance.
"""
from __future__ import annotations

import base64
import io
import random
import threading
import time
from collections import Counter

import bentoml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.config import from_env
from serving.schemas import (Guidance, NegativePrompt, NumImages, Prompt, ResponseFormat, Seed, Side, Steps,
                             field_error, parse_size)

CFG = from_env()
BATCHING = CFG.max_batch_size > 1


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@bentoml.service(name="t2i-model", traffic={"timeout": CFG.timeout_s}, workers=1)
class ImageModel:
    """Holds the variant; one batchable method over a list of generation requests."""

    def __init__(self) -> None:
        from export.loader import load

        t0 = time.perf_counter()
        self.gen = load(CFG.export_dir, CFG.variant, CFG.device)
        self.load_s = time.perf_counter() - t0
        self.batch_sizes: Counter[int] = Counter()
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        if CFG.warmup:  # first calls pay allocator / kernel-selection / compile costs: pay them now
            from core.sampling import GenerationRequest

            for b in sorted({1, CFG.max_batch_size}):
                self.gen.generate([GenerationRequest("warm-up", num_inference_steps=2, seed=i) for i in range(b)])
        self.warmup_s = time.perf_counter() - t0
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    # max_batch_size 1 = batching off: a plain method, one request per call, in arrival order.
    @bentoml.api(**({"batchable": True, "max_batch_size": CFG.max_batch_size, "max_latency_ms": CFG.max_latency_ms}
                    if BATCHING else {}))
    def generate_batch(self, requests: list[dict]) -> list[dict]:
        """Each request: GenerationRequest fields. Each result: base64 PNGs and whether the prompt
        was truncated to the tokenizer's length."""
        from core.sampling import GenerationRequest

        reqs = [GenerationRequest(**r) for r in requests]
        with self._lock:
            self.batch_sizes[len(reqs)] += 1
            t0 = time.perf_counter()
            images = self.gen.generate(reqs)
            compute_ms = round(1000 * (time.perf_counter() - t0), 1)
        return [{"images": [base64.b64encode(_png(im)).decode() for im in ims], **self._truncation(r.prompt),
                 "batch_size": len(reqs), "compute_ms": compute_ms}
                for r, ims in zip(reqs, images)]

    def _truncation(self, prompt: str) -> dict:
        """Whether the prompt was cut to the tokenizer's length, and what the model read if so."""
        tok = self.gen.tokenizer
        ids = tok(prompt).input_ids
        if len(ids) <= tok.model_max_length:
            return {"truncated": False, "read_prompt": None}
        return {"truncated": True, "read_prompt": tok.decode(ids[1:tok.model_max_length - 1], skip_special_tokens=True)}

    @bentoml.api
    def info(self) -> dict:
        g = self.gen
        return {"variant": g.info.get("variant"), "export_dir": str(CFG.export_dir),
                "native_size": g.native_size, "sizes": [f"{side}x{side}" for side in g.sides()],
                "size_range": {"min": g.min_size, "max": g.max_size, "multiple_of": g.size_factor},
                "max_prompt_tokens": g.tokenizer.model_max_length,
                "scheduler": g.scheduler_config.get("_class_name"),
                "bench": g.info.get("bench", {}), "quality": g.info.get("quality", {}),
                "torch_threads": __import__("torch").get_num_threads(), "load_s": round(self.load_s, 2), "warmup_s": round(self.warmup_s, 2),
                "batches_run": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


async def _info_route(request: Request) -> Response:
    from _bentoml_sdk.service import get_current_service

    return JSONResponse(await get_current_service().info())


# BentoML mounts passively at "/": only GET /info reaches this app, every other path stays BentoML's.
@bentoml.asgi_app(Starlette(routes=[Route("/info", _info_route, methods=["GET"])]), path="/")
@bentoml.service(name="t2i-api", traffic={"timeout": CFG.timeout_s, "max_concurrency": CFG.max_concurrency})
class ImageAPI:
    """The HTTP API apps call. Validates, forwards to ``ImageModel``, encodes the answer."""

    model = bentoml.depends(ImageModel)

    def __init__(self) -> None:
        self._model_info: dict | None = None

    async def model_info(self) -> dict:
        """The variant's fixed facts (sizes, tokenizer length), fetched once from the model service."""
        if self._model_info is None:
            self._model_info = await self.model.to_async.info()
        return self._model_info

    async def info(self) -> dict:
        limits = {"max_prompt_chars": CFG.max_prompt_chars, "max_images": CFG.max_images,
                  "steps": [1, 100], "guidance_scale": [0.0, 30.0], "max_batch_size": CFG.max_batch_size,
                  "max_latency_ms": CFG.max_latency_ms, "max_concurrency": CFG.max_concurrency,
                  "timeout_s": CFG.timeout_s}
        fresh = await self.model.to_async.info()  # batch counts change, so not the cached copy
        self._model_info = fresh
        return {**fresh, "limits": limits}

    async def _check_size(self, field: str | None, width: int, height: int, raw=None) -> JSONResponse | None:
        """Width and height independently: multiples of ``size_range.multiple_of`` within its bounds."""
        info = await self.model_info()
        r = info["size_range"]
        ok = [side % r["multiple_of"] == 0 and r["min"] <= side <= r["max"] for side in (width, height)]
        if all(ok):
            return None
        field = field or ("width" if not ok[0] else "height")
        return JSONResponse(field_error(field, f"size {width}x{height} is not supported by variant {info['variant']}: "
                                        f"width and height must be multiples of {r['multiple_of']} from {r['min']} "
                                        f"to {r['max']} (native {info['native_size']})",
                                        raw if raw is not None else [width, height]), status_code=400)

    async def _run(self, prompt: str, negative_prompt: str, steps: int, guidance: float, seed: int | None,
                   width: int, height: int, n: int) -> dict:
        req = {"prompt": prompt, "negative_prompt": negative_prompt, "num_inference_steps": steps,
               "guidance_scale": guidance, "seed": random.randrange(2**31) if seed is None else seed,
               "width": width, "height": height, "num_images": n}
        import aiohttp
        from bentoml.exceptions import ServiceUnavailable

        for attempt in range(2):  # generation is idempotent (seeded): one retry on a dropped connection
            try:
                return (await self.model.to_async.generate_batch([req]))[0]
            except aiohttp.ClientConnectionError as e:  # the model service closed a kept-alive connection
                if attempt:
                    raise ServiceUnavailable(f"model service unreachable ({type(e).__name__}); retry later") from e

    @bentoml.api(route="/generate")
    async def generate(self, prompt: Prompt, negative_prompt: NegativePrompt = "", num_inference_steps: Steps = 20,
                       guidance_scale: Guidance = 5.0, seed: Seed | None = None, width: Side | None = None,
                       height: Side | None = None, num_images: NumImages = 1) -> Image.Image:
        """One PNG (``image/png``); with ``num_images`` > 1, the images side by side in one PNG.
        Header ``X-Prompt-Truncated: true`` when the prompt was cut to the tokenizer's 77 tokens."""
        native = (await self.model_info())["native_size"]
        w, h = width or native, height or native
        if (bad := await self._check_size(None, w, h)) is not None:
            return bad
        out = await self._run(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, w, h, num_images)
        pngs = [base64.b64decode(s) for s in out["images"]]
        body = pngs[0] if len(pngs) == 1 else _side_by_side(pngs)
        headers = {"X-Prompt-Truncated": str(out["truncated"]).lower(), "X-Num-Images": str(len(pngs)),
                   "X-Batch-Size": str(out["batch_size"]), "X-Compute-Ms": str(out["compute_ms"])}
        return Response(body, media_type="image/png", headers=headers)  # bytes as they are, no re-encode

    @bentoml.api(route="/v1/images/generations")
    async def images_generations(self, prompt: Prompt, n: NumImages = 1, size: str | None = None,
                                 response_format: ResponseFormat = "b64_json", model: str | None = None,
                                 quality: str | None = None, style: str | None = None, user: str | None = None,
                                 negative_prompt: NegativePrompt = "", num_inference_steps: Steps = 20,
                                 guidance_scale: Guidance = 5.0, seed: Seed | None = None) -> dict:
        """OpenAI's Images API (``client.images.generate(..., response_format="b64_json")``).
        ``model``, ``quality``, ``style`` and ``user`` are accepted and ignored; the diffusion fields
        (steps, guidance, seed, negative prompt) can be sent with the SDK's ``extra_body``."""
        native = (await self.model_info())["native_size"]
        if size is None:
            w = h = native
        elif (wh := parse_size(size)) is None:
            return JSONResponse(field_error("size", "must look like 64x64", size), status_code=400)
        else:
            w, h = wh
        if (bad := await self._check_size("size", w, h, size)) is not None:
            return bad
        out = await self._run(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, w, h, n)
        body = {"created": int(time.time()),  # revised_prompt: what the model read, when truncated
                "data": [{"b64_json": b, "revised_prompt": out["read_prompt"]} for b in out["images"]]}
        return JSONResponse(body, headers={"X-Prompt-Truncated": str(out["truncated"]).lower()})


def _side_by_side(pngs: list[bytes]) -> bytes:
    import numpy as np

    arrays = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]
    return _png(np.concatenate(arrays, axis=1))

