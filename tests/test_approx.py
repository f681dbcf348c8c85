"""Approximate variants (export.variants.approx): switched off they are the base exactly; switched on
they run less of the network, the same way in the request loop and the step engine. The export side
(built, gated, loaded) is in test_export.py."""
import numpy as np
import pytest
import torch

from core.errors import UserError
from core.sampling import GenerationRequest
from export.variants import get
from export.variants.approx import apply
from tests.test_stepper import MIXED, assert_same_as_alone


@pytest.fixture()
def gen(micro_model):
    from export.common import load_torch_parts, torch_generator

    return torch_generator(micro_model, *load_torch_parts(micro_model), torch.float32, "cpu")


def images(gen, reqs=MIXED):
    return [np.stack(x).astype(int) for x in gen.generate(reqs)]


def count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    return calls


def unet_rows(gen):
    rows = []
    gen.backend.unet_model.register_forward_pre_hook(lambda m, a, k: rows.append(a[0].shape[0]), with_kwargs=True)
    return rows


def test_switched_off_they_reproduce_the_base_exactly(gen):
    base = images(gen)
    for kind, off in (("trunc", 0.0), ("cache", 1)):
        apply(gen, kind, off)
        assert all((a == b).all() for a, b in zip(base, images(gen))), kind


def test_guidance_truncation_drops_the_unconditional_rows_of_the_last_steps(gen):
    req = [GenerationRequest("a red circle", num_inference_steps=10, guidance_scale=5.0, seed=1)]
    rows = unet_rows(gen)
    base = images(gen, req)
    assert rows == [2] * 10
    apply(gen, "trunc", 0.4)
    rows.clear()
    approx = images(gen, req)
    assert rows == [2] * 6 + [1] * 4
    assert any((a != b).any() for a, b in zip(base, approx))


def test_feature_caching_skips_the_deep_blocks_between_whole_steps(gen):
    req = [GenerationRequest("a red circle", num_inference_steps=9, seed=1)]
    unet = gen.backend.unet_model
    deep, shallow = count_calls(unet.mid_block.resnets[0]), count_calls(unet.up_blocks[-1].resnets[0])
    base = images(gen, req)
    assert len(deep) == len(shallow) == 9
    apply(gen, "cache", 3)
    deep.clear(), shallow.clear()
    approx = images(gen, req)
    assert len(deep) == 3 and len(shallow) == 9  # steps 0, 3, 6 run it all; the rest only the shallow path
    assert any((a != b).any() for a, b in zip(base, approx))
    assert "forward" not in vars(gen.backend.unet_model.mid_block)  # the stand-ins are gone after the call


def test_feature_caching_from_a_fraction_runs_the_early_steps_whole(gen):
    req = [GenerationRequest("a red circle", num_inference_steps=10, seed=1)]
    deep = count_calls(gen.backend.unet_model.mid_block.resnets[0])
    apply(gen, "cache", 3)
    cached = images(gen, req)
    deep.clear()
    apply(gen, "cachefrom", 0.5)
    late = images(gen, req)
    assert len(deep) == 5 + 2  # steps 0-4 whole, then 5 and 8 (7 of 10; cache3 alone: 0, 3, 6, 9)
    assert [gen.whole_unet_step(i, 10) for i in range(10)] == [True] * 6 + [False, False, True, False]
    assert any((a != b).any() for a, b in zip(cached, late))
    apply(gen, "cachefrom", 0.0)  # from0 is cache3 itself
    assert all((a == b).all() for a, b in zip(cached, images(gen, req)))


def test_token_merging_attends_over_fewer_tokens_at_the_top_resolution(gen):
    from export.variants.tome import merge_plan

    x = torch.randn(2, 64, 8)
    x[:, 1] = x[:, 0]  # token 1 (a source) repeats token 0 (its window's destination): the first to merge
    merge, unmerge = merge_plan(x, 8, 8, 1 / 64)
    assert merge(x).shape == (2, 63, 8) and torch.equal(unmerge(merge(x)), x)
    merge, unmerge = merge_plan(x, 8, 8, 0.5)
    assert merge(x).shape == (2, 32, 8) and unmerge(merge(x)).shape == x.shape

    req = [GenerationRequest("a red circle", num_inference_steps=3, seed=1)]
    unet = gen.backend.unet_model
    tokens = []
    for name, module in unet.named_modules():
        if name.endswith("attn1.to_q"):
            module.register_forward_pre_hook(lambda m, a: tokens.append(a[0].shape[1]))
    base = images(gen, req)
    top = max(tokens)
    apply(gen, "tome", 0.5)
    tokens.clear()
    approx = images(gen, req)
    assert max(tokens) == top // 2 and top not in tokens  # every top-resolution self-attention merged half
    assert any((a != b).any() for a, b in zip(base, approx))


@pytest.mark.parametrize("approx", [[("trunc", 0.5)], [("cache", 2)], [("cache", 2), ("cachefrom", 0.4)],
                                    [("tome", 0.5)]], ids=["trunc", "cache", "cachefrom", "tome"])
def test_the_step_engine_gives_each_request_its_images_alone(gen, approx):
    for kind, param in approx:
        apply(gen, kind, param)
    assert_same_as_alone(gen)


def test_names_parse_or_fail_with_the_syntax():
    v = get("onnx-int8+trunc0.4")
    assert (v.base, v.approx) == ("onnx-int8", [("trunc", 0.4)])
    assert get("eager-fp32+cache3+trunc0.5").approx == [("cache", 3.0), ("trunc", 0.5)]
    assert get("eager-fp32+cache3").unsupported("cpu") is None
    assert get("onnx-fp32+cache2").unsupported("cpu") is None
    assert get("compile+cache2").unsupported("cpu")  # one compiled graph: nothing to split
    assert get("eager-fp32+tome0.5+cache2").approx == [("tome", 0.5), ("cache", 2.0)]
    assert get("onnx-int8+cache2from0.4").approx == [("cache", 2.0), ("cachefrom", 0.4)]
    assert "torch UNet" in get("onnx-int8+tome0.5").unsupported("cpu")
    for bad in ("eager-fp32+trunc1.5", "eager-fp32+cache0", "eager-fp32+tome", "eager-fp32+tome1", "nope+cache2", "eager-fp32+cache2+cache3",
                "eager-fp32+cache2from1", "eager-fp32+from0.5", "eager-fp32+cache2from0.4+cache3"):
        with pytest.raises(UserError):
            get(bad)
