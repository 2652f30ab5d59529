"""The pattern store: CRUD, search with thresholds and fallback, bad input (durability: test_durability.py)."""

import json

import pytest
import torch

from moeprune import FormatVersionError, MoepruneError, Profile
from moeprune.profiles import STATS
from moeprune.store import PatternStore

E, DIM = 8, 8


def synthetic(domain, centre, n=12, fingerprint="sha256:m", seed=0, spread=0.05):
    """A profile whose demonstrations cluster around `centre`, and its pattern."""
    g = torch.Generator().manual_seed(seed)
    sigs = torch.tensor(centre, dtype=torch.float32) + spread * torch.randn(n, DIM, generator=g)
    scores = torch.rand(2, E, generator=g, dtype=torch.float64)
    meta = {"model_type": "mixtral", "family": "Mixtral", "fingerprint": fingerprint, "domain": domain,
            "n_prompts": n, "n_tokens": 100, "moe_layers": [0, 1], "num_experts": E, "top_k": 2, "groups": None,
            "tcess_threshold": 0.0}
    prof = Profile({k: scores.clone() for k in STATS}, sigs, meta, None, sigs * 2)
    return prof, prof.select(keep=0.5, criterion="frequency")


def onehot(i, scale=1.0):
    v = [0.0] * DIM
    v[i] = scale
    return v


def test_add_get_list_remove(store, tmp_path):
    assert store.names() == ["bible", "code", "legal"] and len(store) == 3
    entry = store.get("code")
    assert entry.domain == "code" and entry.pattern.counts == {0: 4, 1: 4}
    assert store.profile("code").signatures.shape == (12, DIM)
    info = store.info()
    assert info["patterns"] == 3 and info["vectors"] == 36 and info["index"] == "flat"
    assert store.find("code").kept == entry.pattern.kept and store.find("nope") is None
    assert store.find("../code") is None
    store.remove("bible")
    assert store.names() == ["code", "legal"] and store.find("bible") is None
    assert PatternStore(tmp_path / "store").info()["vectors"] == 24
    with pytest.raises(MoepruneError, match="no pattern named 'bible'"):
        store.get("bible")
    with pytest.raises(MoepruneError, match="no pattern named"):
        store.remove("bible")


def test_search_matches_and_falls_back(store):
    m = store.search(torch.tensor(onehot(1)) + 0.01)
    assert m.name == "bible" and not m.fell_back and 0 < m.confidence <= 1 and m.runner_up in ("code", "legal")
    near_two = torch.tensor(onehot(0)) + torch.tensor(onehot(2))  # between code and legal, close to neither
    far = torch.tensor(onehot(5))  # unlike every stored pattern
    m = store.search(far)
    assert m.fell_back and "union" in m.reason
    assert m.pattern.n_kept >= store.get(m.runner_up or "code").pattern.n_kept
    m = store.search(far, expert_budget=4)
    assert m.fell_back and m.name is None and "all experts" in m.reason and m.pattern.counts == {0: E, 1: E}
    m = store.search(near_two, threshold=-1.0)
    assert not m.fell_back and m.name in ("code", "legal")
    matches = store.search_many([torch.tensor(onehot(i)) for i in range(3)])
    assert [x.name for x in matches] == ["code", "bible", "legal"]


def test_hidden_signature_kind(tmp_path):
    s = PatternStore(tmp_path / "h", signature="hidden")
    for i, d in enumerate(["a", "b"]):
        prof, pat = synthetic(d, onehot(i), seed=i)
        s.add(d, prof, pat)
    assert s.info()["signature"]["kind"] == "hidden"
    assert s.search(torch.tensor(onehot(1, 2.0))).name == "b"


def test_bad_input(store, tmp_path):
    prof, pat = synthetic("code", onehot(0))
    with pytest.raises(MoepruneError, match="already in store"):
        store.add("code", prof, pat)
    store.add("code", prof, pat, replace=True)
    other, other_pat = synthetic("x", onehot(3), fingerprint="sha256:other")
    with pytest.raises(MoepruneError, match="use another store"):
        store.add("x", other, other_pat)
    for bad in ("../evil", "a/b", ".hidden", "", "x" * 200, "-dash"):
        with pytest.raises(MoepruneError, match="invalid pattern name"):
            store.add(bad, prof, pat)
    with pytest.raises(MoepruneError, match="not selected from this profile"):
        store.add("mix", prof, other_pat)
    with pytest.raises(MoepruneError, match="empty"):
        store.search("   ")
    with pytest.raises(MoepruneError, match="needs the model"):
        store.search("some text")
    with pytest.raises(MoepruneError, match="no pattern store"):
        PatternStore(tmp_path / "nothing").info()


def test_corrupt_index_is_rebuilt_or_reported(store, tmp_path):
    (store.path / "index.faiss").write_bytes(b"garbage")
    strict = PatternStore(store.path, auto_rebuild=False)
    with pytest.raises(MoepruneError, match="moeprune store rebuild"):
        strict.info()
    fresh = PatternStore(store.path)
    assert fresh.search(torch.tensor(onehot(2))).name == "legal"
    assert fresh.index_status.startswith("rebuilt")
    assert PatternStore(store.path, auto_rebuild=False).info()["index_status"] == "ok"
    # a stale index (entries changed behind its back) is detected by the checksum
    entry = store.entries_dir / "legal.json"
    data = json.loads(entry.read_text())
    data["tags"] = {"edited": True}
    entry.write_text(json.dumps(data))
    with pytest.raises(MoepruneError, match="stale"):
        PatternStore(store.path, auto_rebuild=False).info()


def test_newer_manifest_is_refused(store):
    m = json.loads(store.manifest_path.read_text())
    m["format_version"] = 9
    store.manifest_path.write_text(json.dumps(m))
    with pytest.raises(FormatVersionError, match="newer"):
        PatternStore(store.path).info()


def test_corrupt_entry_is_named(store):
    (store.entries_dir / "code.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(MoepruneError, match="code"):
        PatternStore(store.path).rebuild_index()


# Durability (kill -9 during adds, concurrent writers, a crash at every write step): test_durability.py
