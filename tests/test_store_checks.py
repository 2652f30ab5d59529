"""The pattern store validates what it reads, and its options and index kinds do what they say."""

import json
import logging
import os
import re
import time

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


# ---------------------------------------------------------------- corrupt entries while serving
def _write_json(path, data):
    path.write_text(json.dumps(data))


def _corrupt_tensors(store, name):
    f = store.entries_dir / f"{name}.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF  # still loadable: only its checksum tells
    f.write_bytes(bytes(blob))


CORRUPTIONS = {
    "bad JSON": lambda s: (s.entries_dir / "bible.json").write_text('{"pattern": '),
    "ids out of range": lambda s: _edit_entry(s, "bible", lambda d: d["pattern"]["kept"]["0"].__setitem__(0, 999)),
    "another model": lambda s: _edit_entry(s, "bible", lambda d: d["pattern"].__setitem__("fingerprint", "sha256:x")),
    "tensors changed": lambda s: _corrupt_tensors(s, "bible"),
    "tensors missing": lambda s: (s.entries_dir / "bible.safetensors").unlink(),
}
REASONS = {"bad JSON": "is corrupt", "ids out of range": r"\[999\] are out of range",
           "another model": "pattern of another model", "tensors changed": "do not match their checksum",
           "tensors missing": "missing or do not match"}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_entry_is_left_out_while_serving(store, kind, caplog):
    from test_store import synthetic

    queries = {name: torch.tensor(onehot(i)) for i, name in enumerate(["code", "bible", "legal"])}
    serving = PatternStore(store.path, on_corrupt="skip")  # in use before the entry goes bad
    assert [m.name for m in serving.search_many(list(queries.values()))] == list(queries)
    assert serving.skipped == {} and serving.names() == ["bible", "code", "legal"]
    index_files = {f: (store.path / f).read_bytes() for f in ("index.json", "index.faiss")}

    CORRUPTIONS[kind](store)
    # a writer in skip mode may go on adding patterns, but writes no index files that lack bible
    writer = PatternStore(store.path, on_corrupt="skip")
    writer.add("extra", *synthetic("extra", onehot(3), seed=3))
    assert {f: (store.path / f).read_bytes() for f in index_files} == index_files
    assert writer.rebuild_index()["names"] == ["code", "extra", "legal"]
    assert {f: (store.path / f).read_bytes() for f in index_files} == index_files

    with caplog.at_level(logging.WARNING, "moeprune"):
        for _ in range(3):  # searches go on with the rest, from one snapshot each
            got = serving.search_many([queries["code"], queries["legal"], torch.tensor(onehot(3))])
            assert [m.name for m in got] == ["code", "legal", "extra"]
            assert got[0].pattern.kept == store.get("code").pattern.kept
            assert serving.search(queries["bible"]).name != "bible"
    assert list(serving.skipped) == ["bible"] and re.search(REASONS[kind], serving.skipped["bible"])
    assert serving.find("bible") is None and serving.find("legal") is not None
    assert serving.names() == ["code", "extra", "legal"]
    assert serving.index_status.startswith("in memory only, without 1 corrupt entry (bible)")
    info = serving.info()
    assert info["patterns"] == 3 and list(info["skipped"]) == ["bible"]
    warned = [r.getMessage() for r in caplog.records if r.name == "moeprune"]
    assert len(warned) == 1 and "'bible'" in warned[0] and "moeprune store remove" in warned[0], warned

    # the default (the CLI's): refuse, naming the entry and the way out
    for action in (lambda s: s.search(queries["code"]), lambda s: s.find("code"), lambda s: s.info(),
                   lambda s: s.rebuild_index()):
        with pytest.raises(MoepruneError, match=REASONS[kind]) as e:
            action(PatternStore(store.path))
        assert "bible" in str(e.value) and "store remove" in str(e.value)
    PatternStore(store.path).remove("bible")  # the way out: the index files are written again, complete
    assert serving.skipped == {} and serving.index_status == "ok" and serving.names() == ["code", "extra", "legal"]
    assert PatternStore(store.path, auto_rebuild=False).info()["index_status"] == "ok"


@pytest.mark.parametrize("kind", ["ids out of range", "tensors changed"])
def test_an_entry_damaged_in_place_is_seen(store, kind):
    """In-place edits leave the entries folder's timestamps alone: a rescan of the files' stats sees them."""
    serving = PatternStore(store.path, on_corrupt="skip")
    assert serving.search(torch.tensor(onehot(1))).name == "bible" and serving.skipped == {}
    CORRUPTIONS[kind](store)
    deadline = time.monotonic() + 60  # a rescan runs every RECHECK_MIN_S, or 10x its cost on a slow machine
    while serving.search(torch.tensor(onehot(1))).name == "bible" and time.monotonic() < deadline:
        time.sleep(store_module.RECHECK_MIN_S / 5)
    assert serving.search(torch.tensor(onehot(1))).name != "bible" and list(serving.skipped) == ["bible"]
    assert serving.search(torch.tensor(onehot(2))).name == "legal"


def test_every_entry_corrupt_and_on_corrupt_checked(store):
    for name in store.names():
        _edit_entry(store, name, lambda d: d.pop("n_demonstrations"))
    serving = PatternStore(store.path, on_corrupt="skip")
    with pytest.raises(MoepruneError, match=r"holds no patterns \(3 corrupt entries left out: bible, code, legal\)"):
        serving.search(torch.tensor(onehot(0)))
    assert serving.names() == [] and sorted(serving.skipped) == ["bible", "code", "legal"]
    assert PatternStore(store.path / "nowhere", on_corrupt="skip").names() == []
    with pytest.raises(MoepruneError, match="on_corrupt must be one of raise, skip"):
        PatternStore(store.path, on_corrupt="ignore")


# ---------------------------------------------------------------- snapshots
def test_a_store_this_user_cannot_lock_is_still_searchable(store, monkeypatch):
    real_open = store_module.os.open

    def open_without_lock(path, flags, *args, **kwargs):  # a read-only store of another user, even as root
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", open_without_lock)
    reader = PatternStore(store.path)
    assert reader.search(torch.tensor(onehot(1))).name == "bible" and reader.index_status == "ok"
    _edit_entry(store, "legal", lambda d: d.__setitem__("tags", {"edited": True}))  # the index is stale now
    before = (store.path / "index.json").read_bytes()
    fresh = PatternStore(store.path)
    assert fresh.search(torch.tensor(onehot(2))).name == "legal"
    assert fresh.index_status == "rebuilt: it does not match the stored patterns (stale) (in memory only: the " \
                                 "store is read-only)"
    assert (store.path / "index.json").read_bytes() == before


def test_a_change_within_the_timestamps_granularity_is_seen(store, monkeypatch):
    """Changes whose timestamps (and file stats) do not differ from the snapshot's: the contents tell."""
    reader = PatternStore(store.path)
    assert reader.find("bible") is not None
    frozen = tuple(None if part is None else (part[0], time.time_ns(), part[2]) for part in reader._stamp())
    monkeypatch.setattr(PatternStore, "_stamp", lambda self: frozen)
    monkeypatch.setattr(PatternStore, "_files", lambda self: frozenset())
    reader._snap = None
    assert reader.find("bible") is not None  # read now, with a stamp a moment old
    PatternStore(store.path).remove("bible")
    assert reader.find("bible") is None and reader.search(torch.tensor(onehot(1))).name != "bible"
    assert reader.names() == ["code", "legal"]


def test_readers_wait_for_a_writer_mid_change(store):
    import fcntl
    import threading

    want = store.get("code").pattern.kept
    reader = PatternStore(store.path)
    got = []

    def find():
        try:
            got.append(reader.find("code"))
        except Exception as e:  # reported below
            got.append(e)

    fd = os.open(store.path / ".lock", os.O_RDWR)
    try:
        # a writer removing bible, its tensors first: the index still looks fresh, and bible looks corrupt
        fcntl.flock(fd, fcntl.LOCK_EX)
        (store.entries_dir / "bible.safetensors").unlink()
        t = threading.Thread(target=find)
        t.start()
        t.join(0.5)
        assert t.is_alive() and not got, got  # it waits rather than read a half-changed store
        (store.entries_dir / "bible.json").unlink()
    finally:
        os.close(fd)  # the writer is done (its index rebuild is left to the reader)
    t.join(60)
    assert got[0].kept == want and reader.names() == ["code", "legal"] and reader.find("bible") is None
