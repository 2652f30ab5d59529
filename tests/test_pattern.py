"""Selection (uniform, global, group-aware, random), pattern files, set operations, diagnostics."""

import json

import pytest
import torch

from moeprune import FormatVersionError, MoepruneError, Pattern, Profile, diagnose, select_union
from moeprune.profiles import STATS


def make_profile(scores, top_k=2, groups=None, fingerprint="sha256:test", domain="d", routing=None):
    scores = torch.as_tensor(scores, dtype=torch.float64)
    n_layers, n = scores.shape
    stats = {k: scores.clone() for k in STATS}
    meta = {"model_type": "mixtral", "family": "Mixtral", "fingerprint": fingerprint, "domain": domain,
            "n_prompts": 1, "n_tokens": 10, "moe_layers": list(range(n_layers)), "num_experts": n,
            "top_k": top_k, "groups": groups, "tcess_threshold": 0.0}
    return Profile(stats, torch.zeros(1, n), meta, routing)


def test_uniform_keeps_top_scores():
    scores = torch.tensor([[5, 1, 4, 2, 8, 0, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.float64)
    p = make_profile(scores).select(keep=0.5, criterion="frequency")
    assert p.kept == {0: [0, 2, 4, 7], 1: [4, 5, 6, 7]}
    assert p.is_uniform and p.n_kept == 8 and p.meta["criterion"] == "frequency"
    assert make_profile(scores).select(keep=3).counts == {0: 3, 1: 3}
    assert make_profile(scores).select(keep=1.0).counts == {0: 8, 1: 8}


def test_global_spends_budget_where_routing_is_spread():
    concentrated = [100, 1, 1, 1, 1, 1, 1, 1]
    spread = [10, 9, 9, 8, 8, 7, 7, 6]
    prof = make_profile([concentrated, spread, concentrated])
    uni = prof.select(keep=0.5, strategy="uniform")
    glo = prof.select(keep=0.5, strategy="global")
    assert glo.n_kept == uni.n_kept == 12
    assert glo.counts[1] > 4 and glo.counts[0] < 4 and all(c >= 2 for c in glo.counts.values())
    assert not glo.is_uniform
    # the global choice keeps at least as much total normalised score as the uniform one
    shares = prof.scores("frequency") / prof.scores("frequency").sum(-1, keepdim=True)

    def kept_share(pattern):
        return sum(float(shares[i, ids].sum()) for i, ids in pattern.kept.items())

    assert kept_share(glo) >= kept_share(uni)


def test_group_constraints_respected():
    groups = {"n_group": 2, "topk_group": 1, "min_per_group": 2}
    torch.manual_seed(0)
    prof = make_profile(torch.rand(4, 8), groups=groups)
    for strategy in ("uniform", "global"):
        pattern = prof.select(keep=0.5, strategy=strategy)
        for ids in pattern.kept.values():
            assert sum(e < 4 for e in ids) == sum(e >= 4 for e in ids) >= 2
    with pytest.raises(MoepruneError, match="equal counts: use 4 or 6"):
        prof.select(keep=5)
    with pytest.raises(MoepruneError, match="minimum of 4"):
        prof.select(keep=2)


def test_random_is_seeded():
    prof = make_profile(torch.ones(3, 16))
    a, b, c = (prof.select(keep=0.25, criterion="random", seed=s) for s in (1, 1, 2))
    assert a.kept == b.kept and a.kept != c.kept and a.meta["seed"] == 1


@pytest.mark.parametrize("keep", [0.0, 1.5, -0.25, float("nan"), 9, 0, True, "half"])
def test_keep_out_of_range(keep):
    with pytest.raises(MoepruneError):
        make_profile(torch.rand(2, 8)).select(keep=keep)


def test_keep_below_top_k():
    with pytest.raises(MoepruneError, match="top-k = 2"):
        make_profile(torch.rand(2, 8)).select(keep=0.1)
    with pytest.raises(MoepruneError, match="unknown strategy"):
        make_profile(torch.rand(2, 8)).select(keep=0.5, strategy="best")
    with pytest.raises(MoepruneError, match="unknown criterion"):
        make_profile(torch.rand(2, 8)).select(keep=0.5, criterion="vibes")


def test_json_round_trip_and_versions(tmp_path):
    pattern = make_profile(torch.rand(3, 8)).select(keep=0.5, strategy="global")
    path = pattern.save(tmp_path / "p.json")
    back = Pattern.load(path)
    assert back.kept == pattern.kept and back.meta["strategy"] == "global"
    assert back.meta["format_version"] == 1 and back.meta["domains"] == ["d"]
    data = json.loads(path.read_text())
    data["format_version"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(FormatVersionError, match="newer"):
        Pattern.load(path)
    path.write_text("{not json")
    with pytest.raises(MoepruneError, match="not valid JSON"):
        Pattern.load(path)
    path.write_text(json.dumps({"kept": {}}))
    with pytest.raises(MoepruneError, match="not a moeprune pattern"):
        Pattern.load(path)
    with pytest.raises(MoepruneError, match="not found"):
        Pattern.load(tmp_path / "missing.json")


def test_union_and_jaccard():
    a = Pattern({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, {"num_experts": 8, "fingerprint": "f", "domains": ["a"]})
    b = Pattern({0: [2, 3, 4, 5], 1: [0, 1, 2, 3]}, {"num_experts": 8, "fingerprint": "f", "domains": ["b"]})
    assert a.jaccard_per_layer(b) == {0: pytest.approx(2 / 6), 1: 1.0}
    assert a.jaccard(b) == pytest.approx((2 / 6 + 1) / 2)
    u = a.union(b)
    assert u.kept == {0: [0, 1, 2, 3, 4, 5], 1: [0, 1, 2, 3]} and u.meta["domains"] == ["a", "b"]
    other = Pattern({0: [0, 1], 1: [0, 1]}, {"num_experts": 8, "fingerprint": "g"})
    with pytest.raises(MoepruneError, match="different models"):
        a.union(other)


def test_select_union_normalises_each_domain():
    big = make_profile([[1000, 900, 0, 0, 0, 0, 0, 0]], domain="big")
    small = make_profile([[0, 0, 0, 0, 0, 0, 2, 1]], domain="small")
    mixed = select_union([big, small], keep=4, criterion="frequency")
    # without per-domain normalisation 'big' would not matter more; with it both domains get their experts
    assert mixed.kept == {0: [0, 1, 6, 7]} and mixed.meta["domains"] == ["big", "small"]
    with pytest.raises(MoepruneError, match="different models"):
        select_union([big, make_profile([[1] * 8], fingerprint="other")], keep=4)


def test_diagnostics():
    routing = torch.tensor([[[0, 1], [0, 2], [3, 4], [1, 0]]], dtype=torch.int16)  # 1 layer, 4 tokens
    mass = [[4, 3, 1, 1, 1, 0, 0, 0]]
    prof = make_profile(mass, routing=routing)
    pattern = Pattern({0: [0, 1, 5, 6]}, {"num_experts": 8, "fingerprint": "sha256:test"})
    d = diagnose(prof, pattern)
    assert d.mass_kept[0] == pytest.approx(7 / 10)
    assert d.miss_rate[0] == pytest.approx(2 / 4) and d.any_layer_miss == pytest.approx(0.5)
    full = prof.select(keep=1.0)
    assert diagnose(prof, full).mean_mass_kept == 1.0 and diagnose(prof, full).mean_miss_rate == 0.0
    with pytest.raises(MoepruneError, match="different models"):
        diagnose(make_profile(mass, fingerprint="x"), pattern)
