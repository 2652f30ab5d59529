"""Models whose experts run transformers' native quantized kernels (the GPU paths of FP8 and MXFP4).

Native FP8 experts dispatch through transformers' second experts registry; moeprune's recording
implementation must be found there too (before, profiling raised KeyError). Native MXFP4 on a GPU
replaces the whole MoE block with a kernel that never calls the router module: hooks there would
record and mask nothing, so profile and keep_mask refuse it. Both are built here on the CPU: FP8
experts holding float weights take transformers' plain `F.linear` path, and the MXFP4 block is
only constructed, never run.
"""

from __future__ import annotations

import pytest
import torch
from tiny import char_tokenizer, tiny_model

import moeprune
from moeprune import MoepruneError
from moeprune.hooks import keep_mask
from moeprune.routers import get_adapter

fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")

PROMPTS = ["the quick brown fox", "jumps over the lazy dog", "pack my box with five dozen liquor jugs"]


def _native_fp8_experts(model) -> int:
    """Swap every MoE layer's experts for transformers' native FP8 experts class holding the same
    (float) weights, wired to the FP8 experts registry the way transformers' FP8 loader does it."""
    from transformers.integrations.moe import use_experts_implementation

    class NativeFp8Experts(fp8.FP8Experts):  # a subclass: wrapping mutates the class it is given
        pass

    cls = use_experts_implementation(experts_class=NativeFp8Experts, experts_interface=fp8.ALL_FP8_EXPERTS_FUNCTIONS)
    adapter = get_adapter(model)
    swapped = 0
    for _, block in adapter.blocks(model):
        old = block.experts
        new = cls(model.config, block_size=(128, 128))
        new.gate_up_proj = torch.nn.Parameter(old.gate_up_proj.detach().clone(), requires_grad=False)
        new.down_proj = torch.nn.Parameter(old.down_proj.detach().clone(), requires_grad=False)
        block.experts = new
        swapped += 1
    return swapped


def test_profile_records_native_fp8_experts():
    tok = char_tokenizer()
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("eager")  # the FP8 registry's fused kernels need a GPU
    ref = moeprune.profile(model, PROMPTS, tokenizer=tok)
    assert _native_fp8_experts(model) == len(ref.moe_layers)
    assert isinstance(get_adapter(model).experts(get_adapter(model).blocks(model)[0][1]), fp8.FP8Experts)
    got = moeprune.profile(model, PROMPTS, tokenizer=tok)
    for stat in ("frequency", "mass", "gate_norm"):
        assert torch.allclose(got.stats[stat], ref.stats[stat], rtol=1e-5, atol=1e-6), stat
    assert model.config._experts_implementation == "eager"  # restored


def _native_mxfp4(model) -> None:
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP

    for layer in model.model.layers:
        with torch.device("meta"):
            layer.mlp = Mxfp4GptOssMLP(layer.mlp.router, Mxfp4GptOssExperts(model.config))


def test_native_mxfp4_is_refused_not_recorded_as_nothing():
    model = tiny_model("gpt_oss")
    _native_mxfp4(model)
    adapter = get_adapter(model)
    router = adapter.router(adapter.blocks(model)[0][1])
    with pytest.raises(MoepruneError, match="Mxfp4GptOssExperts .*bypass the router") as e:
        moeprune.profile(model, PROMPTS, tokenizer=char_tokenizer())
    assert "\n" not in str(e.value)
    n = adapter.num_experts(model.config)
    with pytest.raises(MoepruneError, match="Mxfp4GptOssExperts"), keep_mask(model, adapter, {0: torch.ones(n, dtype=torch.bool)}):
        pass
    assert not router._forward_hooks and not router._forward_pre_hooks  # nothing left behind
