"""Step-level continuous batching: requests join a running set between denoising steps.

``StepEngine`` owns a ``Generator`` and one background thread. Every iteration it admits queued
requests (FIFO, while their UNet rows fit ``max_rows``), runs one UNet call over the current step
of every running request of the same image size (each with its own timestep, latents, scheduler
state, guidance scale and text embeddings; classifier-free guidance per sample), then decodes the
requests that finished, batched. A request asks for nothing from its company: the image it gets in
a mixed set is the image ``Generator.generate`` gives it alone (tests pin it within 1/255).

    engine = StepEngine(load("runs/demo/export"), max_rows=16)
    images = engine.submit(GenerationRequest("a red circle", num_inference_steps=30)).result().images

A request whose ``cancelled(request)`` turns true leaves the set at the next step (its future gets
``None``); the queue is bounded (``max_queue_rows``: ``submit`` raises ``EngineFull`` beyond it).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from core.sampling import GenerationRequest, Generator


class EngineFull(Exception):
    """The queue holds ``max_queue_rows`` UNet rows already; retry later."""


@dataclass
class StepResult:
    images: list[np.ndarray]  # uint8 HWC, one per image of the request
    peak_rows: int  # the largest UNet batch it ran in
    queue_s: float  # from submit to its first step's batch
    run_s: float  # from its first step to its images


class EngineObserver:
    """Hooks the engine calls (no-ops here; serving records them as Prometheus metrics)."""

    def step(self, rows: int, requests: int, seconds: float) -> None: ...

    def queue(self, rows: int) -> None: ...

    def first_step(self, seconds: float) -> None: ...


@dataclass
class _Slot:
    req: GenerationRequest
    future: Future
    enqueued: float
    rows: int
    step: int = 0
    steps: int = 0
    peak_rows: int = 0
    started: float = 0.0
    latents: torch.Tensor | None = None
    emb: torch.Tensor | None = None  # [uncond rows (guided only)..., cond rows]
    sched: object = None
    timesteps: list = field(default_factory=list)
    guided_steps: int = 0  # steps with classifier-free guidance (fewer with Generator.guidance_truncation)
    deep: torch.Tensor | None = None  # features kept by its last whole-UNet step (Generator.cache_interval > 1)

    @property
    def size(self) -> tuple[int, int]:
        return self.latents.shape[-2], self.latents.shape[-1]

    @property
    def guided(self) -> bool:
        return self.req.guidance_scale > 1.0

    @property
    def guided_now(self) -> bool:
        """This step runs the unconditional rows too."""
        return self.guided and self.step < self.guided_steps


class StepEngine:
    """One background loop over ``gen``; ``submit`` is thread-safe and returns a Future of the
    request's ``StepResult``, or of ``None`` when it was cancelled."""

    def __init__(self, gen: Generator, max_rows: int = 16, max_queue_rows: int = 256,
                 cancelled: Callable[[GenerationRequest], bool] | None = None,
                 observer: EngineObserver | None = None):
        self.gen, self.max_rows, self.max_queue_rows = gen, max_rows, max_queue_rows
        self.cancelled = cancelled or (lambda r: False)
        self.observer = observer or EngineObserver()
        self._queue: deque[_Slot] = deque()
        self._running: list[_Slot] = []
        self._cv = threading.Condition()
        self._stop = False
        self.stats = {"steps": 0, "rows": 0, "max_running_rows": 0, "admitted": 0, "finished": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._loop, name="t2i-step-engine", daemon=True)
        self._thread.start()

    # -- callers' side -------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> Future:
        self.gen.check_size(req.width or self.gen.native_size, req.height or self.gen.native_size)
        fut: Future = Future()
        with self._cv:
            queued = sum(s.rows for s in self._queue)
            if queued + req.unet_rows > self.max_queue_rows:
                raise EngineFull(f"{queued} UNet rows queued, limit {self.max_queue_rows}")
            self._queue.append(_Slot(req, fut, time.perf_counter(), req.unet_rows))
            self.observer.queue(queued + req.unet_rows)
            self._cv.notify()
        return fut

    def progress(self) -> dict:
        """What runs now: each running request's step and step count, and the queue."""
        with self._cv:
            return {"running": [{"request_id": s.req.request_id, "step": s.step, "steps": s.steps}
                                for s in self._running],
                    "running_rows": sum(s.rows for s in self._running),
                    "queued_requests": len(self._queue), "queued_rows": sum(s.rows for s in self._queue),
                    **self.stats}

    def wake(self) -> None:
        """Makes the loop look at cancellations now (it otherwise does at its next step)."""
        with self._cv:
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._queue and not self._running:
                    self._cv.wait()
                if self._stop:
                    break
                admitted = self._take()
            try:
                self._admit(admitted)
                self._drop_cancelled()
                if self._running:
                    self._step()
                    self._finish()
            except Exception as e:  # noqa: BLE001 - fail the requests at hand, keep serving the next ones
                for s in admitted + self._running:
                    if not s.future.done():
                        s.future.set_exception(e)
                with self._cv:
                    self._running = []
        for s in list(self._queue) + self._running:
            if not s.future.done():
                s.future.set_result(None)

    def _take(self) -> list[_Slot]:
        """FIFO: the queue's head joins while its rows fit next to the running set (alone, always)."""
        rows = sum(s.rows for s in self._running)
        out = []
        while self._queue:
            head = self._queue[0]
            if self.cancelled(head.req):
                self._queue.popleft().future.set_result(None)
                self.stats["cancelled"] += 1
                continue
            if rows and rows + head.rows > self.max_rows:
                break
            out.append(self._queue.popleft())
            rows += head.rows
        if out:
            self.observer.queue(sum(s.rows for s in self._queue))
        return out

    @torch.no_grad()
    def _admit(self, slots: list[_Slot]) -> None:
        """Text encoding (one call for all the admitted), noise and a scheduler per request."""
        if not slots:
            return
        gen = self.gen
        texts = []
        for s in slots:
            r = s.req
            texts += ([r.negative_prompt or ""] * r.num_images if s.guided else []) + [r.prompt] * r.num_images
        emb = gen.encode(texts)
        k = 0
        for s in slots:
            r = s.req
            s.emb, k = emb[k:k + s.rows], k + s.rows
            s.latents = gen.noise([r.seed + j for j in range(r.num_images)], r.height or gen.native_size,
                                  r.width or gen.native_size)
            s.sched = gen.new_scheduler()
            s.sched.set_timesteps(r.num_inference_steps)
            s.timesteps = list(s.sched.timesteps)
            s.steps = len(s.timesteps)
            s.guided_steps = gen.guided_steps(s.steps)
            s.latents = s.latents * s.sched.init_noise_sigma
        with self._cv:
            self._running += slots
        self.stats["admitted"] += len(slots)

    def _drop_cancelled(self) -> None:
        gone = [s for s in self._running if self.cancelled(s.req)]
        if gone:
            with self._cv:
                self._running = [s for s in self._running if s not in gone]
            for s in gone:
                s.future.set_result(None)
            self.stats["cancelled"] += len(gone)

    @torch.no_grad()
    def _step(self) -> None:
        """One UNet call per image size over every running request's current step (with feature
        caching, one for the requests at a whole-UNet step and one for those on their kept features)."""
        by_size: dict[tuple, list[_Slot]] = {}
        interval = self.gen.cache_interval
        for s in self._running:
            rows_now = len(s.latents) * (2 if s.guided_now else 1)
            shallow = (interval > 1 and not self.gen.whole_unet_step(s.step, s.steps) and s.deep is not None
                       and s.deep.shape[0] == rows_now)
            by_size.setdefault((s.size, shallow), []).append(s)
        for (_, shallow), group in by_size.items():
            ins, ts, embs = [], [], []
            for s in group:
                t = s.timesteps[s.step]
                lat = torch.cat([s.latents, s.latents]) if s.guided_now else s.latents
                ins.append(s.sched.scale_model_input(lat, t))
                ts.append(t.reshape(1).expand(lat.shape[0]))  # the scheduler's dtype: Euler's are fractional
                embs.append(s.emb if s.guided_now or not s.guided else s.emb[len(s.latents):])
            x, t_rows, emb = torch.cat(ins), torch.cat(ts), torch.cat(embs)
            rows = x.shape[0]  # (a backend compiled for fixed shapes pads to its own buckets)
            t0 = time.perf_counter()
            if interval > 1:
                deep = torch.cat([s.deep for s in group]) if shallow else None
                noise, deep = self.gen.backend.unet_cached(x, t_rows, emb, deep)
                noise = noise.float()
            else:
                noise = self.gen.backend.unet(x, t_rows, emb).float()
            dt = time.perf_counter() - t0
            self.gen.unet_time_s += dt
            self.gen.unet_calls += 1
            self.stats["steps"] += 1
            self.stats["rows"] += rows
            self.stats["max_running_rows"] = max(self.stats["max_running_rows"], rows)
            self.observer.step(rows, len(group), dt)
            k = 0
            for s in group:
                n = len(s.latents) * (2 if s.guided_now else 1)
                out = noise[k:k + n]
                if interval > 1 and not shallow:
                    s.deep = deep[k:k + n]
                k += n
                if s.guided_now:
                    uncond, cond = out.chunk(2)
                    g = torch.tensor(s.req.guidance_scale, dtype=torch.float32)
                    out = uncond + g * (cond - uncond)
                s.peak_rows = max(s.peak_rows, rows)
                if s.step == 0:
                    s.started = t0
                    self.observer.first_step(t0 - s.enqueued)
                s.latents = s.sched.step(out, s.timesteps[s.step], s.latents, return_dict=False)[0]
                s.step += 1

    @torch.no_grad()
    def _finish(self) -> None:
        done = [s for s in self._running if s.step >= s.steps]
        if not done:
            return
        with self._cv:
            self._running = [s for s in self._running if s.step < s.steps]
        by_size: dict[tuple, list[_Slot]] = {}
        for s in done:
            by_size.setdefault(s.size, []).append(s)
        for group in by_size.values():
            images = self.gen.to_images(torch.cat([s.latents for s in group]))
            k = 0
            for s in group:
                n = s.req.num_images
                s.future.set_result(StepResult(images[k:k + n], s.peak_rows,
                                               s.started - s.enqueued, time.perf_counter() - s.started))
                k += n
        self.stats["finished"] += len(done)
