"""Step-level continuous batching (core.stepper): outputs do not depend on company, cancelled
requests leave the running set, the queue is bounded. The server side is in test_serving.py."""
import threading
import time

import numpy as np
import pytest
import torch

from core.sampling import GenerationRequest
from core.stepper import EngineFull, StepEngine

MIXED = [GenerationRequest("a red circle", num_inference_steps=10, guidance_scale=1.0, seed=1, request_id="a"),
         GenerationRequest("a blue square", num_inference_steps=20, guidance_scale=5.0, seed=2, request_id="b",
                           negative_prompt="a green cross"),
         GenerationRequest("a green cross", num_inference_steps=30, guidance_scale=8.0, seed=3, request_id="c",
                           num_images=2, negative_prompt="red")]


def assert_same_as_alone(gen, reqs=MIXED, max_rows: int = 16, tol: int = 1) -> StepEngine:
    """Every request's images from one mixed running set equal the images it gets alone (within tol/255)."""
    alone = [gen.generate([r])[0] for r in reqs]
    engine = StepEngine(gen, max_rows=max_rows)
    try:
        futures = [engine.submit(r) for r in reqs]
        got = [f.result(timeout=300) for f in futures]
    finally:
        engine.close()
    for r, a, g in zip(reqs, alone, got):
        assert len(g.images) == r.num_images
        for x, y in zip(a, g.images):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= tol, r
    assert engine.stats["max_running_rows"] == sum(r.unet_rows for r in reqs)  # they did share UNet calls
    return engine


@pytest.fixture(scope="module")
def gen(micro_model):
    from export.common import load_torch_parts, torch_generator

    return torch_generator(micro_model, *load_torch_parts(micro_model), torch.float32, "cpu")


def test_mixed_steps_guidance_and_negatives_match_alone(gen):
    engine = assert_same_as_alone(gen)
    assert engine.stats["steps"] == 30 and engine.stats["finished"] == 3  # 30 steps: the longest request's


def test_a_scheduler_with_fractional_timesteps_gets_them_exactly(gen):
    """Euler's timesteps are fractional: each row gets its step's exact timestep, as it does alone."""
    import copy

    euler = copy.copy(gen)
    euler.scheduler_config = {**gen.scheduler_config, "_class_name": "EulerDiscreteScheduler",
                              "timestep_spacing": "linspace"}
    sched = euler.new_scheduler()
    sched.set_timesteps(7)
    assert (sched.timesteps != sched.timesteps.round()).any()  # the case the test is about
    seen, unet = [], gen.backend.unet

    class Recording:  # the same backend, recording the timesteps the engine passes
        def __getattr__(self, name):
            return getattr(gen.backend, name)

        def unet(self, x, t, emb):
            seen.append(torch.as_tensor(t).reshape(-1).clone())
            return unet(x, t, emb)

    euler.backend = Recording()
    assert_same_as_alone(euler, [GenerationRequest("a red circle", num_inference_steps=7, seed=1, request_id="a"),
                                 GenerationRequest("a blue square", num_inference_steps=7, seed=2, request_id="b")],
                         tol=0)
    alone, batched = seen[:14], seen[14:]
    assert len(batched) == 7 and all(len(t) == 4 for t in batched)  # two guided requests per UNet call
    for i, t in enumerate(sched.timesteps):
        assert torch.equal(alone[i].float(), t.reshape(1).float())
        assert torch.equal(batched[i].float(), t.repeat(4).float()), (i, batched[i], t)


def test_requests_join_between_steps(gen):
    """A request submitted while another runs joins at a step boundary instead of waiting for it to end."""
    engine = StepEngine(gen, max_rows=16)
    try:
        long = engine.submit(GenerationRequest("a red circle", num_inference_steps=60, seed=1))
        while engine.progress()["running"] == [] or engine.progress()["running"][0]["step"] < 3:
            time.sleep(0.005)
        short = engine.submit(GenerationRequest("a blue square", num_inference_steps=5, seed=2))
        short.result(timeout=120)
        assert not long.done()  # the short one finished while the long one ran
        assert long.result(timeout=120).peak_rows == 4
    finally:
        engine.close()


def test_cancelled_request_leaves_and_frees_its_rows(gen):
    cancelled: set[str] = set()
    engine = StepEngine(gen, max_rows=2, cancelled=lambda r: r.request_id in cancelled)
    try:
        big = engine.submit(GenerationRequest("a red circle", num_inference_steps=500, request_id="big"))
        waiting = engine.submit(GenerationRequest("a blue square", num_inference_steps=3, request_id="next"))
        while not engine.progress()["running"]:
            time.sleep(0.005)
        assert engine.progress()["queued_rows"] == 2  # 2 + 2 rows do not fit max_rows 2: it waits
        cancelled.add("big")
        assert big.result(timeout=30) is None
        assert waiting.result(timeout=60).images[0].shape == (32, 32, 3)
        assert engine.stats["cancelled"] == 1 and engine.progress()["running_rows"] == 0
    finally:
        engine.close()


def test_queue_is_bounded(gen):
    engine = StepEngine(gen, max_rows=2, max_queue_rows=4)
    release = threading.Event()
    try:
        engine.cancelled = lambda r: release.is_set()
        first = engine.submit(GenerationRequest("a red circle", num_inference_steps=500))
        while not engine.progress()["running"]:
            time.sleep(0.005)
        engine.submit(GenerationRequest("a", num_inference_steps=2))
        engine.submit(GenerationRequest("b", num_inference_steps=2))  # 4 rows queued
        with pytest.raises(EngineFull):
            engine.submit(GenerationRequest("c", num_inference_steps=2))
        release.set()
        assert first.result(timeout=30) is None
    finally:
        engine.close()


def test_bad_size_is_refused_at_submit(gen):
    engine = StepEngine(gen)
    try:
        with pytest.raises(Exception, match="multiple"):
            engine.submit(GenerationRequest("a red circle", width=36))
    finally:
        engine.close()
