"""Perplexity: the formula, windows, slim and export paths, and bad data."""

import json
import math

import pytest
import torch
from tiny import char_tokenizer, save_tiny, tiny_model

import moeprune
from moeprune import MoepruneError, PromptError, evaluate
from moeprune.cli import main
from moeprune.evaluate import _windows

TEXTS = ["In the beginning God created the heaven and the earth. " * 3, "def f(x):\n    return x + 1\n"]


def test_matches_direct_computation():
    model, tok = tiny_model("qwen3_moe", max_position_embeddings=512), char_tokenizer()
    result = evaluate(model, TEXTS, tokenizer=tok, window=512)
    ids = []
    for t in TEXTS:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
    assert result.tokens == len(ids) - 1 and result.documents == 2
    assert result.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


@pytest.mark.parametrize(("n", "window", "stride"), [(100, 32, 32), (100, 32, 16), (33, 32, 32), (5, 8, 8), (50, 7, 3)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for start, end, first in _windows(n, window, stride):
        assert end - start <= window and start < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_stride_gives_context():
    model, tok = tiny_model("mixtral"), char_tokenizer()
    a = evaluate(model, TEXTS, tokenizer=tok, window=16, stride=16)
    b = evaluate(model, TEXTS, tokenizer=tok, window=16, stride=4)
    assert a.tokens == b.tokens and a.perplexity != b.perplexity


def test_slim_and_export_paths(tmp_path):
    tok = char_tokenizer()
    full = save_tiny("olmoe", tmp_path / "src")
    pattern = moeprune.profile(full, TEXTS, tokenizer=tok).select(keep=0.5)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    slim = evaluate(tmp_path / "src", data, pattern=pattern, window=64)
    moeprune.export(tmp_path / "src", pattern, tmp_path / "out")
    exported = evaluate(tmp_path / "out", data, window=64)
    assert slim.perplexity == pytest.approx(exported.perplexity, rel=1e-5)
    whole = evaluate(tmp_path / "src", data, window=64)
    assert whole.perplexity != pytest.approx(slim.perplexity, rel=1e-6)


def test_bad_data(tmp_path, capsys):
    model, tok = tiny_model("mixtral"), char_tokenizer()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptError, match="empty"):
        evaluate(model, empty, tokenizer=tok)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "x"}\n')
    eos_less = char_tokenizer()
    eos_less.eos_token = None
    with pytest.raises(MoepruneError, match="at least 2"):
        evaluate(model, short, tokenizer=eos_less)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(PromptError, match=r"bad\.jsonl, line 2"):
        evaluate(model, bad, tokenizer=tok)
    with pytest.raises(PromptError, match="not found"):
        evaluate(model, tmp_path / "nope.jsonl", tokenizer=tok)
    with pytest.raises(MoepruneError, match="window"):
        evaluate(model, TEXTS, tokenizer=tok, window=1)
    save_tiny("mixtral", tmp_path / "m")
    other = moeprune.profile(tiny_model("mixtral", seed=3), TEXTS, tokenizer=tok).select(keep=0.5)
    other.save(tmp_path / "other.json")
    assert main(["eval", str(tmp_path / "m"), "--pattern", str(tmp_path / "other.json"), "--data", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a longer piece of text to score"}\n')
    assert main(["eval", str(tmp_path / "m"), "--pattern", str(tmp_path / "other.json"), "--data", str(good)]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m"), "--data", str(good), "-q"]) == 0
    assert "perplexity" in capsys.readouterr().out
