"""The BentoML services: ``ImageModel`` (loads the export dir's variant, batches requests) and
``ImageAPI`` in front of it (validation, ``/generate``, OpenAI's ``/v1/images/generations``, ``/info``).

    bentoml serve serving.service:ImageAPI          # or: t2i serve EXPORT_DIR

Three batching modes (``T2I_BATCHING``). ``step`` (default): ``core.stepper.StepEngine`` runs in the
model service and requests join its running set between denoising steps, whatever their steps,
guidance, seed or negative prompt; every UNet call holds up to ``max_batch_size`` rows. ``request``:
BentoML's batcher groups whole requests: the API sends each image as one list item (a guided image
as two: it takes two UNet rows), so ``max_batch_size`` counts UNet rows, and the export engine runs
the items that share steps and size as one batch. ``off``: one request at a time.
``serving.guard`` checks every request before BentoML parses it (JSON only, size, time, API key)
and cancels the request of a client that left.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import threading
import time
import uuid
from collections import Counter

import bentoml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.config import from_env
from serving.guard import RequestGuard, log, openai_error
from serving.schemas import (Guidance, NegativePrompt, NumImages, Prompt, ResponseFormat, Seed, Side, Steps,
                             field_error, parse_size)

CFG = from_env()
MODE = CFG.batching if CFG.max_batch_size > 1 else "off"
CANCEL_MEMORY_S = 600.0  # how long the model remembers a cancelled request id


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class _OneLineClientErrors(logging.Filter):
    """BentoML logs every 400 as an ERROR with a traceback; a client's mistake is one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from pydantic import ValidationError

        code = getattr(getattr(exc, "error_code", None), "value", 500)
        if isinstance(exc, ValidationError) or 400 <= code < 500:
            first = " ".join(str(exc).split())[:240]
            record.msg, record.args = "%s %s: %s", (400 if isinstance(exc, ValidationError) else code,
                                                    record.getMessage().removeprefix("Exception on "), first)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_OneLineClientErrors())


def _resources() -> dict:
    """One GPU when the service runs on CUDA (T2I_DEVICE, else the export's device), so BentoML
    schedules it on a GPU; nothing to ask for on the CPU."""
    device = CFG.device
    if device is None:
        try:
            from export.manifest import read_manifest

            device = read_manifest(CFG.export_dir).device
        except Exception:  # noqa: BLE001 - a broken export dir is reported by the model's load, not here
            device = None
    return {"gpu": 1} if device == "cuda" else {}


@bentoml.service(name="t2i-model", traffic={"timeout": CFG.timeout_s}, workers=1, resources=_resources())
class ImageModel:
    """Holds the variant; one batchable method over a list of per-image items."""

    def __init__(self) -> None:
        self.ready, self.error = False, None
        self.batch_sizes: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._cancelled: dict[str, float] = {}
        # load in the background: the worker answers at once, /readyz says 503 until the model is warm
        threading.Thread(target=self._load, name="t2i-load", daemon=True).start()

    def _load(self) -> None:
        from core.sampling import GenerationRequest
        from core.stepper import StepEngine
        from export.loader import load

        try:
            t0 = time.perf_counter()
            self.gen = load(CFG.export_dir, CFG.variant, CFG.device, trusted=CFG.trusted_artifacts)
            self.load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if CFG.warmup:  # first calls pay allocator / kernel-selection / compile costs: pay them now
                for images in sorted({1, max(1, CFG.max_batch_size // 2)}):  # guided: two rows per image
                    self.gen.generate([GenerationRequest("warm-up", num_inference_steps=2, seed=i)
                                       for i in range(images)])
                if getattr(self.gen.backend, "row_buckets", None):  # a compiled UNet: every batch shape it will see
                    from export.variants.compiled import warm_up

                    warm_up(self.gen, [], max_rows=CFG.max_batch_size)
            self.warmup_s = time.perf_counter() - t0
            if MODE == "step":
                from serving.metrics import EngineMetrics

                self.engine = StepEngine(self.gen, max_rows=CFG.max_batch_size, max_queue_rows=CFG.max_concurrency,
                                         cancelled=lambda r: r.request_id in self._cancelled,
                                         observer=EngineMetrics())
            self.ready = True
        except Exception as e:  # noqa: BLE001 - whatever broke, say it in one line and stay not ready
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.error("the model did not load: %s", self.error)

    def __is_ready__(self) -> bool:
        return self.ready

    def __is_alive__(self) -> bool:
        return self.error is None

    # off (or step, which does not call it): a plain method, one request per call, in arrival order.
    @bentoml.api(**({"batchable": True, "max_batch_size": CFG.max_batch_size, "max_latency_ms": CFG.max_latency_ms}
                    if MODE == "request" else {}))
    def generate_batch(self, items: list[dict]) -> list[dict]:
        """Each item: GenerationRequest fields for one image, or ``{"pad": id}`` (a guided image's second
        UNet row, which only makes the batcher count it). One result per item: a base64 PNG, whether
        the prompt was truncated, the batch's UNet rows and compute time; ``cancelled`` for items
        whose request was cancelled before or while they ran."""
        from bentoml.exceptions import ServiceUnavailable

        from core.sampling import GenerationRequest

        if not self.ready:
            raise ServiceUnavailable("the model is still loading; retry when /readyz is 200")
        out: list[dict] = [{"pad": True} for _ in items]
        reqs, where = [], []
        for i, item in enumerate(items):
            if "pad" in item:
                continue
            if item.get("request_id") in self._cancelled:
                out[i] = {"cancelled": True}
                continue
            reqs.append(GenerationRequest(**item))
            where.append(i)
        if not reqs:
            return out
        rows = sum(r.unet_rows for r in reqs)
        with self._lock:
            self.batch_sizes[rows] += 1
            t0 = time.perf_counter()
            images = self.gen.generate(reqs, cancelled=lambda r: r.request_id in self._cancelled)
            compute_ms = round(1000 * (time.perf_counter() - t0), 1)
        for i, r, ims in zip(where, reqs, images):
            out[i] = self._answer(ims[0], r.prompt, rows, compute_ms) if ims else {"cancelled": True}
        return out

    @bentoml.api
    async def generate_steps(self, items: list[dict]) -> list[dict]:
        """Step batching: the same items and results as ``generate_batch``, each image its own request
        in the engine's running set (pads are skipped). ``batch_size`` is the largest UNet call the
        request ran in."""
        from bentoml.exceptions import ServiceUnavailable

        from core.sampling import GenerationRequest
        from core.stepper import EngineFull

        if not self.ready:
            raise ServiceUnavailable("the model is still loading; retry when /readyz is 200")
        out: list[dict] = [{"pad": True} for _ in items]
        where, futures = [], []
        try:
            for i, item in enumerate(items):
                if "pad" not in item:
                    futures.append(asyncio.wrap_future(self.engine.submit(GenerationRequest(**item))))
                    where.append(i)
        except EngineFull as e:
            for f in futures:
                f.cancel()
            raise ServiceUnavailable(f"the engine's queue is full ({e}); retry shortly") from None
        results = await asyncio.gather(*futures)
        for i, res in zip(where, results):
            if res is None:
                out[i] = {"cancelled": True}
                continue
            self.batch_sizes[res.peak_rows] += 1
            out[i] = self._answer(res.images[0], items[i]["prompt"], res.peak_rows, round(1000 * res.run_s, 1),
                                  queue_ms=round(1000 * res.queue_s, 1))
        return out

    @bentoml.api
    async def cancel(self, request_ids: list[str]) -> int:
        """Marks requests as cancelled: their items are dropped before they start, and a batch made
        only of cancelled items stops at its next step. Returns how many ids it remembers."""
        now = time.monotonic()
        self._cancelled = {k: t for k, t in self._cancelled.items() if now - t < CANCEL_MEMORY_S}
        self._cancelled.update(dict.fromkeys(request_ids, now))
        return len(self._cancelled)

    def _answer(self, image, prompt: str, rows: int, compute_ms: float, **extra) -> dict:
        """One item's result: the PNG (base64), the prompt's truncation, the UNet rows and compute time."""
        return {"image": base64.b64encode(_png(image)).decode(), **self._truncation(prompt), "batch_size": rows,
                "compute_ms": compute_ms, **extra}

    def _truncation(self, prompt: str) -> dict:
        """Whether the prompt was cut to the tokenizer's length, and what the model read if so."""
        tok = self.gen.tokenizer
        ids = tok(prompt).input_ids
        if len(ids) <= tok.model_max_length:
            return {"truncated": False, "read_prompt": None}
        return {"truncated": True, "read_prompt": tok.decode(ids[1:tok.model_max_length - 1], skip_special_tokens=True)}

    @bentoml.api
    async def info(self) -> dict:
        from bentoml.exceptions import ServiceUnavailable

        if not self.ready:
            raise ServiceUnavailable("the model is still loading")
        g = self.gen
        return {"variant": g.info.get("variant"),  # no filesystem paths: they tell a caller about the host
                "native_size": g.native_size, "sizes": [f"{side}x{side}" for side in g.sides()],
                "size_range": {"min": g.min_size, "max": g.max_size, "multiple_of": g.size_factor},
                "max_prompt_tokens": g.tokenizer.model_max_length,
                "scheduler": g.scheduler_config.get("_class_name"),
                "bench": g.info.get("bench", {}), "quality": g.info.get("quality", {}),
                "torch_threads": __import__("torch").get_num_threads(), "load_s": round(self.load_s, 2),
                "warmup_s": round(self.warmup_s, 2),
                "batching": MODE, "batches_run": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                **({"engine": self.engine.progress()} if MODE == "step" else {})}


async def _info_route(request: Request) -> Response:
    from _bentoml_sdk.service import get_current_service

    return JSONResponse(await get_current_service().info())


# BentoML mounts passively at "/": only GET /info reaches this app, every other path stays BentoML's.
# Its own request limit only bounds connections (stalled bodies are cut by the guard's timeout); the
# limit that matters counts images, in ImageAPI.
@bentoml.asgi_app(Starlette(routes=[Route("/info", _info_route, methods=["GET"])]), path="/")
@bentoml.service(name="t2i-api", traffic={"timeout": CFG.timeout_s, "max_concurrency": 4 * CFG.max_concurrency})
class ImageAPI:
    """The HTTP API apps call. Validates, forwards to ``ImageModel``, encodes the answer."""

    model = bentoml.depends(ImageModel)

    def __init__(self) -> None:
        self._model_info: dict | None = None
        self.in_flight = 0  # images in flight, two per guided image (as the batcher counts them)
        self._background: set[asyncio.Task] = set()

    async def model_info(self) -> dict:
        """The variant's fixed facts (sizes, tokenizer length), fetched once from the model service."""
        if self._model_info is None:
            self._model_info = await self.model.to_async.info()
        return self._model_info

    async def info(self) -> dict:
        limits = {"max_prompt_chars": CFG.max_prompt_chars, "max_images": CFG.max_images,
                  "steps": [1, 100], "guidance_scale": [0.0, 30.0], "max_batch_size": CFG.max_batch_size,
                  "max_latency_ms": CFG.max_latency_ms, "max_concurrency": CFG.max_concurrency,
                  "timeout_s": CFG.timeout_s, "max_body_bytes": CFG.max_body_bytes}
        fresh = await self.model.to_async.info()  # batch counts change, so not the cached copy
        self._model_info = fresh
        return {**fresh, "limits": limits, "images_in_flight": self.in_flight}

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
                   width: int, height: int, n: int) -> dict | JSONResponse:
        """Generates ``n`` images as one request's items; 429 when they would take the images in flight
        over max_concurrency. A cancelled call (its client left) cancels its items in the model too."""
        rows = n * (2 if guidance > 1.0 else 1)
        if self.in_flight + rows > CFG.max_concurrency:
            log.info("429: %d images in flight, %d more asked, limit %d", self.in_flight, rows, CFG.max_concurrency)
            return JSONResponse(openai_error(f"too many images in flight ({self.in_flight} of {CFG.max_concurrency},"
                                             f" this request needs {rows}); retry shortly", "rate_limit_exceeded",
                                             kind="rate_limit_error"), status_code=429, headers={"Retry-After": "1"})
        rid = uuid.uuid4().hex
        seed = random.randrange(2**31) if seed is None else seed
        items = []
        for j in range(n):  # one item per image (seed + j, as the engine numbers a request's images)
            items.append({"prompt": prompt, "negative_prompt": negative_prompt, "num_inference_steps": steps,
                          "guidance_scale": guidance, "seed": seed + j, "width": width, "height": height,
                          "num_images": 1, "request_id": rid})
            if guidance > 1.0:
                items.append({"pad": rid})
        self.in_flight += rows
        try:
            out = await self._call_model(items)
        except asyncio.CancelledError:
            task = asyncio.get_running_loop().create_task(self._cancel(rid))
            self._background.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._background.discard)
            raise
        finally:
            self.in_flight -= rows
        images = [o for o in out if "image" in o]
        if len(images) != n:
            from bentoml.exceptions import ServiceUnavailable

            raise ServiceUnavailable("the request was cancelled in the model service; retry")
        return {"images": [o["image"] for o in images], "truncated": images[0]["truncated"],
                "read_prompt": images[0]["read_prompt"], "batch_size": images[0]["batch_size"],
                "compute_ms": images[0]["compute_ms"]}

    async def _cancel(self, rid: str) -> None:
        try:
            await self.model.to_async.cancel([rid])
        except Exception as e:  # noqa: BLE001 - best effort: the work then finishes unseen
            log.info("could not cancel %s in the model service: %s", rid, type(e).__name__)

    async def _call_model(self, items: list[dict]) -> list[dict]:
        import aiohttp
        import httpx
        from bentoml.exceptions import ServiceUnavailable

        for attempt in range(2):  # generation is idempotent (seeded): one retry on a dropped connection
            try:
                if MODE == "step":
                    return await self.model.to_async.generate_steps(items)
                return await self.model.to_async.generate_batch(items)
            except (aiohttp.ClientConnectionError, httpx.TransportError) as e:  # a closed kept-alive connection
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
        if isinstance(out, Response):
            return out
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
            return JSONResponse(field_error("size", "must look like 64x64", size[:40]), status_code=400)
        else:
            w, h = wh
        if (bad := await self._check_size("size", w, h, size)) is not None:
            return bad
        out = await self._run(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, w, h, n)
        if isinstance(out, Response):
            return out
        body = {"created": int(time.time()),  # revised_prompt: what the model read, when truncated
                "data": [{"b64_json": b, "revised_prompt": out["read_prompt"]} for b in out["images"]]}
        return JSONResponse(body, headers={"X-Prompt-Truncated": str(out["truncated"]).lower()})


ImageAPI.add_asgi_middleware(RequestGuard, max_body_bytes=CFG.max_body_bytes, body_timeout_s=CFG.body_timeout_s,
                             api_key=CFG.api_key())


def _side_by_side(pngs: list[bytes]) -> bytes:
    import numpy as np

    arrays = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]
    return _png(np.concatenate(arrays, axis=1))
