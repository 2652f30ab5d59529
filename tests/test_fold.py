"""Folding (moeprune.fold, used by the criteria benchmark): the maths against a hand computation."""

import pytest
import torch
from tiny import tiny_model

from moeprune import MoepruneError, Pattern, Profile, get_adapter
from moeprune.fold import assignments, fold
from moeprune.profiles import STATS


def _profile(mass, n_layers, n):
    stats = {k: torch.zeros(n_layers, n, dtype=torch.float64) for k in STATS}
    stats["mass"] = torch.as_tensor(mass, dtype=torch.float64).expand(n_layers, n).clone()
    meta = {"model_type": "qwen3_moe", "fingerprint": "sha256:test", "domain": "d", "n_prompts": 1, "n_tokens": 10,
            "moe_layers": list(range(n_layers)), "num_experts": n, "top_k": 2, "tcess_threshold": 0.0}
    return Profile(stats, torch.zeros(1, n), meta)


def _experts(model, adapter, layer):
    return {name: model.get_parameter(name).detach().clone() for name in adapter.fused_keys(layer)}


def test_two_experts_fold_into_their_mass_weighted_average():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model.config)
    n = adapter.num_experts(model.config)
    with torch.no_grad():  # expert 2's router row is expert 1's: expert 2 folds into expert 1
        for layer in layers:
            router = model.get_parameter(adapter.router_keys(layer)[0])
            router[2] = router[1]
    before = {layer: _experts(model, adapter, layer) for layer in layers}
    routers = {name: model.get_parameter(name).detach().clone() for layer in layers for name in adapter.router_keys(layer)}
    mass = [1.0, 2.0, 3.0] + [0.0] * (n - 3)  # experts 3.. carry no mass: they change nothing
    pattern = Pattern({layer: [0, 1] for layer in layers}, {"num_experts": n})
    assert all(assignments(model, pattern, "router")[layer][2] == 1 for layer in layers)
    fold(model, pattern, _profile(mass, len(layers), n))
    for layer in layers:
        for name, w in before[layer].items():
            now = model.get_parameter(name).detach()
            torch.testing.assert_close(now[1], (2 * w[1] + 3 * w[2]) / 5)  # by hand
            torch.testing.assert_close(now[0], w[0])
            torch.testing.assert_close(now[2:], w[2:])  # pruned experts are left as they were
    for name, r in routers.items():
        assert torch.equal(model.get_parameter(name), r)  # routers unchanged


def test_weight_similarity_finds_a_copied_expert():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model.config)
    n = adapter.num_experts(model.config)
    with torch.no_grad():
        for layer in layers:
            for name in adapter.fused_keys(layer):
                t = model.get_parameter(name)
                t[5] = t[3] * 1.01
    pattern = Pattern({layer: [0, 3, 6] for layer in layers}, {"num_experts": n})
    assert all(assignments(model, pattern, "weights")[layer][5] == 3 for layer in layers)
    with pytest.raises(MoepruneError, match="unknown similarity"):
        assignments(model, pattern, "cosine")


def test_folding_with_every_expert_kept_changes_nothing():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model.config)
    n = adapter.num_experts(model.config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pattern = Pattern({layer: list(range(n)) for layer in layers}, {"num_experts": n})
    assert assignments(model, pattern) == {layer: {} for layer in layers}
    fold(model, pattern, _profile([1.0] * n, len(layers), n))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
