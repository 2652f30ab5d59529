"""Bad input through the Python API: every case is a MoepruneError that names the problem, and the
user's model and files are left as they were."""

import json
import math

import pytest
import torch
from tiny import char_tokenizer, save_tiny, tiny_model

import moeprune
from moeprune import MoepruneError, Pattern, Profile, PromptError
from moeprune.budget import check_budget, parse_budget, resolve_count
from moeprune.hooks import keep_mask
from moeprune.models import check_model_path
from moeprune.pattern import resolve_keep
from moeprune.prompts import read_prompts
from moeprune.serve.residency import resolve_budget

PROMPTS = ["def add(a, b):\n    return a + b", "In the beginning God created the heaven and the earth."]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe")


@pytest.fixture(scope="module")
def prof(model, tok):
    return moeprune.profile(model, PROMPTS, tokenizer=tok, domain="code")


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------ budgets: one reading everywhere
def test_one_budget_resolver():
    # fractions round up everywhere (selection, serving, the store's fallback budget); counts are counts
    assert resolve_count(0.3, 8) == 3 and resolve_count(0.3, 10) == 3 and resolve_count(0.5, 32) == 16
    assert resolve_keep(0.3, 8, 2) == resolve_budget(0.3, 8, 2) == 3
    assert resolve_count(1.0, 8) == 8 and resolve_count(4, 8) == 4
    for bad in (1, True, 0, -3, 0.0, 1.5, math.nan, "0.5", None):
        with pytest.raises(MoepruneError):
            check_budget(bad)
    with pytest.raises(MoepruneError, match="ambiguous.*1.0"):
        resolve_keep(1, 8, 1)  # one expert, or all of them? refused, never guessed
    with pytest.raises(MoepruneError, match="for a count of 16 experts write 16"):
        check_budget(16.0)
    with pytest.raises(MoepruneError, match="a layer has 8"):
        resolve_count(9, 8)
    assert parse_budget("0.5") == 0.5 and parse_budget("16") == 16 and parse_budget("1.0") == 1.0
    with pytest.raises(MoepruneError, match="--expert-budget must be"):
        parse_budget("abc", "--expert-budget")
    with pytest.raises(MoepruneError, match="--keep=1 is ambiguous"):
        parse_budget("1")


# ------------------------------------------------------------------ patterns
def test_pattern_ids_are_validated_not_truncated(prof, tmp_path):
    good = prof.select(keep=0.5)
    data = good.to_dict()
    cases = {
        "float id": (lambda d: d["kept"]["0"].__setitem__(0, 1.5), "1.5 is not an integer"),
        "bool id": (lambda d: d["kept"]["0"].__setitem__(0, True), "not an integer"),
        "id out of range": (lambda d: d["kept"]["0"].__setitem__(0, 999), r"\[999\] are out of range"),
        "negative id": (lambda d: d["kept"]["0"].__setitem__(0, -1), "negative"),
        "duplicate": (lambda d: d["kept"]["0"].__setitem__(1, d["kept"]["0"][0]), "duplicates"),
        "no fingerprint": (lambda d: d.pop("fingerprint"), "'fingerprint' is missing"),
        "no expert count": (lambda d: d.pop("num_experts"), "'num_experts' is missing"),
        "layer not a number": (lambda d: d["kept"].__setitem__("x", [0, 1]), "layer id 'x'"),
        "empty layer": (lambda d: d["kept"].__setitem__("0", []), "non-empty list"),
    }
    for name, (edit, message) in cases.items():
        d = json.loads(json.dumps(data))
        edit(d)
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(d))
        with pytest.raises(MoepruneError, match=message):
            Pattern.load(f)
    assert Pattern.load(good.save(tmp_path / "good.json")).kept == good.kept


def test_wrong_types_in_the_api(model, tok, prof, tmp_path):
    pattern = prof.select(keep=0.5)
    calls = [
        (lambda: moeprune.profile(123, PROMPTS, tokenizer=tok), "model must be"),
        (lambda: moeprune.profile(model, 5, tokenizer=tok), "prompts must be"),
        (lambda: moeprune.profile(model, [5], tokenizer=tok), "prompt 0 is a int"),
        (lambda: moeprune.profile(model, [""], tokenizer=tok), "prompt 0 is empty"),
        (lambda: moeprune.profile(model, [[{"role": "user"}]], tokenizer=tok), "chat messages"),
        (lambda: moeprune.profile(model, PROMPTS, tokenizer=tok, batch_size=2.5), "batch_size must be an integer"),
        (lambda: moeprune.profile(model, PROMPTS, tokenizer=tok, max_length="long"), "max_length must be"),
        (lambda: moeprune.profile(model, PROMPTS, tokenizer=tok, domain=3), "domain must be a string"),
        (lambda: moeprune.profile(model, PROMPTS, tokenizer="tok"), "tokenizer must be"),
        (lambda: prof.select(keep="0.5"), "keep must be"),
        (lambda: prof.select(criterion=5), "criterion must be a name"),
        (lambda: prof.select(strategy=None), "unknown strategy"),
        (lambda: prof.select(criterion="random", seed=1.5), "seed must be an integer"),
        (lambda: prof.merge(pattern), "merges only with another Profile"),
        (lambda: moeprune.select_union(prof), "list of profiles"),
        (lambda: moeprune.select_union([prof, pattern]), "profile 1 must be"),
        (lambda: moeprune.diagnose(pattern, prof), "must be a moeprune Profile"),
        (lambda: moeprune.diagnose(prof, 5), "pattern must be a Pattern"),
        (lambda: Pattern(5), "must be a dict"),
        (lambda: Pattern.load(5), "loaded from a file path"),
        (lambda: Profile.load(None), "loaded from a folder path"),
        (lambda: moeprune.load_slim(tmp_path, 5), "pattern must be a Pattern"),
        (lambda: moeprune.load_slim(5, pattern), "model path must be"),
        (lambda: moeprune.evaluate(model, 5, tokenizer=tok), "evaluation data must be"),
        (lambda: moeprune.evaluate(model, [3], tokenizer=tok), "evaluation text 0 is a int"),
        (lambda: moeprune.evaluate(None, PROMPTS, tokenizer=tok), "model must be"),
        (lambda: moeprune.export(tmp_path, {}, tmp_path / "o"), "pattern must be a Pattern"),
        (lambda: moeprune.get_adapter(5), "not a supported Mixture-of-Experts"),
    ]
    for call, message in calls:
        with pytest.raises(MoepruneError, match=message):
            call()


# ------------------------------------------------------------------ the user's model survives errors
def test_failed_profile_leaves_the_model_working(model, tok):
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    with torch.no_grad():
        before = model(ids).logits
    hooks = _hooks(model)
    for bad in (dict(batch_size=2.5), dict(max_length=0), dict(tcess_threshold=1.5)):
        with pytest.raises(MoepruneError):
            moeprune.profile(model, PROMPTS, tokenizer=tok, **bad)
    # a failure in the middle of the run, after the hooks went in
    calls = []

    def boom(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    h = model.model.layers[1].mlp.gate.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        moeprune.profile(model, PROMPTS * 2, tokenizer=tok, batch_size=1)
    h.remove()
    assert _hooks(model) == hooks and model.config._experts_implementation == "grouped_mm"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_bad_keep_mask_installs_nothing(model):
    adapter = moeprune.get_adapter(model)
    hooks = _hooks(model)
    good = torch.ones(8, dtype=torch.bool)
    for masks, message in (({0: good, 1: torch.ones(5, dtype=torch.bool)}, "shape"),
                           ({0: good, 7: good}, "not MoE layers")):
        with pytest.raises(MoepruneError, match=message), keep_mask(model, adapter, masks):
            pass
        assert _hooks(model) == hooks


# ------------------------------------------------------------------ lengths beyond the model's context
def test_lengths_beyond_the_context(model, tok, tmp_path):
    ctx = model.config.max_position_embeddings  # 128 for the tiny models
    with pytest.raises(MoepruneError, match=f"beyond the model's context of {ctx}"):
        moeprune.profile(model, PROMPTS, tokenizer=tok, max_length=ctx + 1)
    with pytest.raises(MoepruneError, match=f"window {ctx * 2} is beyond the model's context of {ctx}"):
        moeprune.evaluate(model, PROMPTS, tokenizer=tok, window=ctx * 2)
    long = "x" * (ctx * 3)
    prof = moeprune.profile(model, [long, "short"], tokenizer=tok)  # the default is capped at the context
    assert prof.meta["max_length"] == ctx and prof.meta["n_cut"] == 1 and prof.n_tokens == ctx + 5
    save_tiny("mixtral", tmp_path / "m")
    with pytest.raises(MoepruneError, match="window 999 is beyond"):  # refused before the model loads
        moeprune.evaluate(tmp_path / "m", PROMPTS, window=999)


def test_eval_arguments(model, tok):
    for kwargs, message in ((dict(stride=0), "stride must be >= 1"), (dict(max_tokens=0), "max_tokens must be"),
                            (dict(batch_size=0), "batch_size must be >= 1"), (dict(window=1), "window must be >= 2"),
                            (dict(window=16, stride=32), "must not exceed the window")):
        with pytest.raises(MoepruneError, match=message):
            moeprune.evaluate(model, PROMPTS, tokenizer=tok, **kwargs)


# ------------------------------------------------------------------ prompt files
def test_prompt_sources(tmp_path):
    assert read_prompts("what is 1/2?") == ["what is 1/2?"]  # a question, not a path
    assert read_prompts("see src/main.c for details") == ["see src/main.c for details"]
    with pytest.raises(PromptError, match="not found"):
        read_prompts("prompts/python.jsonl")  # looks like a prompt file that is missing
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufefffirst prompt\nsecond\n".encode())
    assert read_prompts(bom) == ["first prompt", "second"]
    bom_jsonl = tmp_path / "bom.jsonl"
    bom_jsonl.write_bytes(("\ufeff" + json.dumps({"text": "hello"}) + "\n").encode())
    assert read_prompts(bom_jsonl) == ["hello"]
    with pytest.raises(PromptError, match="is a folder"):
        read_prompts(tmp_path)


def test_model_paths(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoepruneError, match="is a file"):
        check_model_path(tmp_path / "file")
    with pytest.raises(MoepruneError, match="has no config.json"):
        check_model_path(tmp_path)
    # a hub id on a machine that cannot reach the hub: one clear error, no download attempt
    import moeprune.models as models

    monkeypatch.setattr(models, "_hub_cache", lambda repo: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: pytest.fail("must not try the network"))
    with pytest.raises(MoepruneError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        check_model_path("someorg/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(MoepruneError, match="cannot be reached"):
        check_model_path("someorg/some-model")
    monkeypatch.setattr(models, "_hub_cache", lambda repo: str(tmp_path))
    assert check_model_path("someorg/some-model") == str(tmp_path)  # a cached copy is used offline


def test_stale_temporary_files_of_single_file_writes_are_removed(prof, tmp_path, caplog):
    import os
    import time

    target = tmp_path / "pattern.json"
    stale, fresh = tmp_path / ".pattern.json.k1l2m3.tmp", tmp_path / ".pattern.json.x9y8z7.tmp"
    for f in (stale, fresh):
        f.write_text("half a pattern")
    old = time.time() - 3600
    os.utime(stale, (old, old))  # a killed writer's leftover; the fresh one may belong to a live writer
    with caplog.at_level("WARNING", logger="moeprune"):
        prof.select(keep=0.5).save(target)
    assert not stale.exists() and fresh.exists() and Pattern.load(target).kept
    assert "left by an interrupted run" in caplog.text
