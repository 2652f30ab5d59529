"""Adapters: routing reproduces transformers, and a keep-mask equals a model without the pruned experts."""

import random

import pytest
import torch
from tiny import FAMILIES, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from moeprune import UnsupportedModelError, get_adapter
from moeprune.errors import MoepruneError
from moeprune.hooks import keep_mask

ALL = list(FAMILIES)


def _sorted(weights, indices):
    order = indices.argsort(dim=-1)
    return weights.gather(-1, order), indices.gather(-1, order)


@pytest.mark.parametrize("model_type", ALL)
def test_route_reproduces_transformers(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    torch.manual_seed(1)
    for _, block in adapter.blocks(model):
        router = adapter.router(block)
        hidden = torch.randn(64, model.config.hidden_size)
        logits, weights, indices = router(hidden)
        w, i = adapter.route(router, logits)
        assert w.dtype == weights.dtype
        ew, ei = _sorted(weights, indices)
        gw, gi = _sorted(w, i)
        assert torch.equal(ei, gi)
        torch.testing.assert_close(gw, ew, rtol=0, atol=0)


def _random_keep(adapter, config, n_keep, rng):
    n = adapter.num_experts(config)
    n_group = int(getattr(config, "n_group", 1) or 1) if hasattr(config, "n_group") else 1
    if n_group > 1:
        size, per = n // n_group, n_keep // n_group
        return sorted(g * size + e for g in range(n_group) for e in rng.sample(range(size), per))
    return sorted(rng.sample(range(n), n_keep))


@pytest.mark.parametrize("model_type", ALL)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_mask_equals_experts_absent(model_type, seed):
    full = tiny_model(model_type, seed=seed)
    adapter = get_adapter(full)
    rng = random.Random(seed)
    kept = {layer: _random_keep(adapter, full.config, 4, rng) for layer, _ in adapter.blocks(full)}
    for ids in kept.values():
        adapter.check_keep(full.config, ids)

    sliced = AutoModelForCausalLM.from_config(adapter.sliced_config(full.config, 4), dtype=torch.float32).eval()
    sliced.load_state_dict(adapter.slice_state_dict(full.state_dict(), kept), strict=True)

    n = adapter.num_experts(full.config)
    masks = {layer: torch.isin(torch.arange(n), torch.tensor(ids)) for layer, ids in kept.items()}
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = full(ids).logits
        with keep_mask(full, adapter, masks):
            masked = full(ids).logits
        pruned = sliced(ids).logits
    assert (masked - pruned).abs().max().item() <= 1e-5
    assert (masked - reference).abs().max().item() > 1e-4  # the mask really changed something
    with torch.no_grad(), keep_mask(full, adapter, masks):
        for layer, block in adapter.blocks(full):
            router = adapter.router(block)
            out = router(torch.randn(200, full.config.hidden_size))
            assert set(out[2].unique().tolist()) <= set(kept[layer])


def test_moe_layer_detection():
    qwen = tiny_model("qwen2_moe")  # mlp_only_layers=[0]
    assert [layer for layer, _ in get_adapter(qwen).blocks(qwen)] == [1, 2]
    ds = tiny_model("deepseek_v3")  # first_k_dense_replace=1
    assert get_adapter(ds).moe_layers(ds.config) == [1, 2]
    step = tiny_model("qwen3_moe", decoder_sparse_step=2, num_hidden_layers=4)
    assert get_adapter(step).moe_layers(step.config) == [1, 3]


def test_dense_model_is_refused():
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match="'llama'.*Mixtral"):
        get_adapter(config)


def test_unknown_moe_architecture_is_refused():
    config = AutoConfig.for_model("granitemoe")
    with pytest.raises(UnsupportedModelError, match="'granitemoe'.*supports"):
        get_adapter(config)


def test_moe_family_configured_without_moe_layers():
    config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[0, 1])
    with pytest.raises(UnsupportedModelError, match="no MoE layer"):
        get_adapter(config)


def test_keep_constraints():
    ds = tiny_model("deepseek_v3")  # 8 experts in 2 groups of 4, top-2, topk_group=1
    a = get_adapter(ds)
    a.check_keep(ds.config, [0, 1, 4, 5])
    with pytest.raises(MoepruneError, match="same number"):
        a.check_keep(ds.config, [0, 1, 2, 4])
    with pytest.raises(MoepruneError, match=">= 2"):
        a.check_keep(ds.config, [0, 4])
    mix = tiny_model("mixtral")
    with pytest.raises(MoepruneError, match="top-k = 2"):
        get_adapter(mix).check_keep(mix.config, [3])
    with pytest.raises(MoepruneError, match=r"\[0, 8\)"):
        get_adapter(mix).check_keep(mix.config, [3, 9])


@pytest.mark.parametrize("model_type", ALL)
def test_checkpoint_key_names(model_type, tmp_path):
    """The adapter's checkpoint names are the ones save_pretrained writes (hub layout)."""
    from safetensors import safe_open

    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    adapter = get_adapter(model)
    n = adapter.num_experts(model.config)
    for layer in adapter.moe_layers(model.config):
        for name in adapter.ckpt_router_keys(layer):
            assert name in keys
        if adapter.ckpt_expert_projs is None:
            for name in adapter.ckpt_fused_keys(layer):
                assert name in keys
        else:
            for e in range(n):
                for name in adapter.ckpt_expert_keys(layer, e):
                    assert name in keys
    state = model.state_dict()
    for layer in adapter.moe_layers(model.config):
        for name in adapter.fused_keys(layer) + adapter.router_keys(layer):
            assert state[name].shape[0] == n
