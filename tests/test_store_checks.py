"""The pattern store validates what it reads, and its options and index kinds do what they say."""

import json

import numpy as np
import pytest
import torch
from test_store import DIM, E, onehot

import moeprune.store.store as store_module
from moeprune import MoepruneError
from moeprune.store import PatternStore
from moeprune.store.store import _auto_thresholds, _normalise


def _edit_entry(store, name, edit):
    f = store.entries_dir / f"{name}.json"
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["pattern"]["kept"]["0"].__setitem__(0, 999), r"\[999\] are out of range"),
    (lambda d: d["pattern"]["kept"]["0"].__setitem__(0, 1.5), "1.5 is not an integer"),
    (lambda d: d.pop("pattern"), "no 'pattern' object"),
    (lambda d: d["pattern"].pop("fingerprint"), "'fingerprint' is missing"),
    (lambda d: d["pattern"].__setitem__("fingerprint", "sha256:other"), "pattern of another model"),
    (lambda d: d["pattern"]["kept"].pop("1"), r"covers MoE layers \[0\]"),
    (lambda d: d.pop("n_demonstrations"), "incomplete"),
])
def test_corrupt_entries_are_named_everywhere(store, edit, message):
    _edit_entry(store, "bible", edit)
    fresh = PatternStore(store.path)
    for action in (lambda: fresh.get("bible"), fresh.list, fresh.info, lambda: fresh.search(torch.tensor(onehot(1)))):
        with pytest.raises(MoepruneError, match=message) as e:
            action()
        assert "bible" in str(e.value) and "store remove" in str(e.value)
    fresh.remove("bible")  # the way out works, and the rest of the store is intact
    assert fresh.names() == ["code", "legal"] and fresh.search(torch.tensor(onehot(2))).name == "legal"


def test_a_folder_that_is_not_a_store(tmp_path):
    for action in ("list", "info", "names_get"):
        s = PatternStore(tmp_path / "nowhere")
        with pytest.raises(MoepruneError, match="no pattern store"):
            s.list() if action == "list" else s.info() if action == "info" else s.get("x")


def test_search_arguments(store):
    q = torch.tensor(onehot(1))
    for kwargs, message in ((dict(k=0), "k .* must be an integer >= 1"), (dict(k=2.5), "must be an integer"),
                            (dict(threshold=2.0), r"cosine similarity in \[-1, 1\]"),
                            (dict(threshold="abc"), "threshold must be"),
                            (dict(expert_budget=1), "ambiguous"), (dict(expert_budget=99), "a layer has 8"),
                            (dict(expert_budget="half"), "expert_budget must be")):
        with pytest.raises(MoepruneError, match=message):
            store.search(q, **kwargs)
    with pytest.raises(MoepruneError, match="list of queries"):
        store.search_many("one string")
    assert store.search(q, k=1000).name == "bible"  # more neighbours than demonstrations is fine


def test_set_options_change_search(store):
    far = torch.tensor(onehot(5))
    assert store.search(far).fell_back
    store.set_options(threshold=-1.0)
    reopened = PatternStore(store.path)
    assert reopened.info()["threshold"] == -1.0
    assert not reopened.search(far).fell_back  # every pattern clears a threshold of -1
    reopened.set_options(threshold="auto", expert_budget=4)
    m = reopened.search(far)
    assert m.fell_back and m.name is None and m.pattern.counts == {0: E, 1: E}  # the union exceeds 4: all experts
    assert PatternStore(store.path).info()["expert_budget"] == 4
    for bad in (dict(threshold=3), dict(threshold="strict"), dict(expert_budget=0), dict(expert_budget=1.5),
                dict(expert_budget=E + 1)):
        with pytest.raises(MoepruneError):
            reopened.set_options(**bad)
    assert PatternStore(store.path).info()["expert_budget"] == 4  # a refused change writes nothing


def test_index_switches_to_hnsw_above_the_flat_limit(store, monkeypatch):
    assert store.info()["index"] == "flat"
    monkeypatch.setattr(store_module, "FLAT_LIMIT", 20)  # the store holds 36 vectors
    meta = store.rebuild_index()
    assert meta["kind"] == "hnsw"
    fresh = PatternStore(store.path)
    info = fresh.info()
    assert info["index"] == "hnsw" and info["index_status"] == "ok"
    import faiss

    assert isinstance(fresh._index, faiss.IndexHNSWFlat)
    for i, name in enumerate(["code", "bible", "legal"]):
        assert fresh.search(torch.tensor(onehot(i))).name == name


def test_auto_threshold_slack_loosens_for_negative_similarities():
    rng = np.random.default_rng(0)
    tight = _normalise(np.tile(onehot(0), (8, 1)) + 0.01 * rng.standard_normal((8, DIM)))
    # a regular simplex: every demonstration's nearest other one is at cosine -1/7
    simplex = _normalise(np.eye(DIM) - 1.0 / DIM)
    t = _auto_thresholds(np.concatenate([tight, simplex]), [8, 8], ["tight", "simplex"])
    q_tight = float(np.quantile((lambda m: (np.fill_diagonal(m, -np.inf), m.max(1))[1])(tight @ tight.T),
                                store_module.AUTO_QUANTILE))
    assert t["tight"] == pytest.approx(q_tight * store_module.AUTO_SLACK, rel=1e-6)
    assert t["simplex"] == pytest.approx(-1 / 7 * (2 - store_module.AUTO_SLACK), rel=1e-5)
    assert t["simplex"] < -1 / 7  # looser than the pattern's own demonstrations, never stricter


def test_slim_and_exported_models_search_like_the_full_model(tmp_path):
    from tiny import char_tokenizer, save_tiny

    import moeprune
    from moeprune import export, load_slim

    tok = char_tokenizer()
    full = save_tiny("qwen3_moe", tmp_path / "src")
    texts = {"code": ["def f(x): return x", "import os", "class A: pass", "for i in range(3): pass"],
             "prose": ["The cat sat on the mat.", "It was a dark night.", "She smiled at him.", "Rain fell."]}
    s = PatternStore(tmp_path / "store")
    for name, lines in texts.items():
        prof = moeprune.profile(full, lines, tokenizer=tok, domain=name)
        s.add(name, prof, prof.select(keep=0.5))
    pattern = s.get("code").pattern
    export(tmp_path / "src", pattern, tmp_path / "exported")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    slim = load_slim(tmp_path / "src", pattern)
    queries = ["while True: pass", "The dog barked."]
    want = [m.name for m in s.search_many(queries, full, tok)]
    assert [m.name for m in s.search_many(queries, exported, tok)] == want
    assert [m.name for m in s.search_many(queries, slim, tok)] == want
    # an export whose routers were changed afterwards is its own model, not the source's
    tampered = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    with torch.no_grad():
        tampered.model.layers[0].mlp.gate.weight.add_(0.5)
    with pytest.raises(MoepruneError, match="not the one this store's patterns belong to"):
        s.search("x = 1", tampered, tok)
    other = save_tiny("qwen3_moe", tmp_path / "other", seed=3)
    with pytest.raises(MoepruneError, match="not the one this store's patterns belong to"):
        s.search("x = 1", other, tok)
