"""How much can be pruned: select_for_target (max_loss by k-fold, min_mass from the profile), the
CLI's select --max-loss/--min-mass, and the curve command. Small sizes: the demo model, a few
short prompts, 2 folds, 3 candidate budgets."""

import json
import math

import pytest
import torch

from moeprune import BudgetSearch, MoepruneError, diagnose, evaluate, profile, select_for_target
from moeprune.cli import main
from moeprune.demo import DEMO_DATA, DEMO_MODEL
from moeprune.hooks import keep_mask
from moeprune.prompts import read_documents, read_prompts
from moeprune.routers import get_adapter
from moeprune.target import (
    candidate_budgets,
    check_target,
    choose_budget,
    legal_budgets,
    monotone,
    parse_fraction,
    pattern_at,
)

N_PROMPTS, MAX_LENGTH, FOLDS, CANDIDATES = 16, 128, 4, [4, 8, 16]
KW = dict(folds=FOLDS, candidates=CANDIDATES)


@pytest.fixture(scope="module")
def demo():
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("the bundled demo model is not present")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def domains(demo):
    """domain -> (prompts, profile) for two demo domains."""
    model, tok = demo
    out = {}
    for d in ("python", "legal"):
        prompts = read_prompts(DEMO_DATA / f"{d}.calib.jsonl")[:N_PROMPTS]
        out[d] = prompts, profile(model, prompts, tokenizer=tok, domain=d, max_length=MAX_LENGTH)
    return out


@pytest.fixture(scope="module")
def chosen(demo, domains):
    """(domain, max_loss, strategy) -> (pattern, report); one k-fold measurement per domain and strategy."""
    model, tok = demo
    searches = {}

    def get(d, max_loss, strategy="uniform"):
        if (d, strategy) not in searches:
            prompts, prof = domains[d]
            searches[d, strategy] = BudgetSearch(prof, model, prompts, tokenizer=tok, strategy=strategy, **KW)
        return searches[d, strategy].select(max_loss=max_loss)

    return get


# ---------------------------------------------------------------------- the search
def test_choose_budget_is_monotone_in_the_target():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        xs = [2, 4, 8, 16, 24, 32]
        curves = [monotone([float(x) for x in torch.rand(5, generator=g) * 2 - 0.2] + [0.0]) for _ in range(3)]
        legal = list(range(2, 33))
        picks = [choose_budget(legal, xs, curves, t) for t in (0.0, 0.01, 0.05, 0.1, 0.3, 0.7, 1.5, 3.0)]
        assert picks == sorted(picks, reverse=True), picks
        assert all(b in legal for b in picks)


def test_monotone_curve():
    assert monotone([0.5, 0.7, 0.1, 0.2, 0.0]) == [0.7, 0.7, 0.2, 0.2, 0.0]


def test_looser_target_never_gives_a_larger_budget(chosen):
    budgets = [chosen("python", t)[1].budget for t in (0.02, 0.05, 0.2, 0.6)]
    assert budgets == sorted(budgets, reverse=True), budgets
    assert budgets[0] > budgets[-1]  # the targets are far enough apart to matter


def test_deterministic(demo, domains, chosen):
    model, tok = demo
    prompts, prof = domains["python"]
    pattern, report = chosen("python", 0.05)
    again, report2 = select_for_target(prof, model, prompts, tokenizer=tok, max_loss=0.05, **KW)
    assert again.kept == pattern.kept
    assert report2.budget == report.budget and report2.predicted_loss == report.predicted_loss
    assert [c.fold_losses for c in report2.candidates] == [c.fold_losses for c in report.candidates]


def test_report(chosen):
    pattern, report = chosen("python", 0.05)
    assert report.predicted_loss <= 0.05 + 1e-9
    lo, hi = report.loss_spread
    assert lo <= report.predicted_loss <= hi
    assert pattern.counts == {layer: report.budget for layer in pattern.kept}
    assert report.kept_fraction == pytest.approx(pattern.kept_fraction)
    assert 0 < report.saved_bytes < report.expert_bytes < report.model_bytes
    assert report.saved_bytes == pytest.approx(report.expert_bytes * (1 - report.kept_fraction), rel=1e-3)
    assert [c.budget for c in report.candidates if c.fold_losses] == CANDIDATES
    assert all(len(c.fold_losses) == FOLDS for c in report.candidates if c.fold_losses)
    text = report.format()
    assert "<- chosen" in text and "predicted perplexity loss" in text
    assert pattern.meta["target"]["max_loss"] == 0.05


def test_global_strategy_budget_is_a_total(demo, domains, chosen):
    pattern, report = chosen("legal", 0.05, "global")
    assert pattern.n_kept == report.budget
    assert report.budget in legal_budgets(domains["legal"][1], "global")
    assert report.predicted_loss <= 0.05 + 1e-9


@pytest.mark.parametrize("d", ["python", "legal"])
def test_prediction_matches_the_held_out_text(demo, chosen, d):
    """The loss predicted from the demonstrations is within the spread, over the held-out
    documents (not used for the profile), of the loss actually measured on them."""
    model, tok = demo
    pattern, report = chosen(d, 0.05)
    adapter = get_adapter(model)
    losses = []
    for doc in read_documents(DEMO_DATA / f"{d}.eval.jsonl"):
        full = evaluate(model, [doc], tokenizer=tok, max_tokens=512)
        with keep_mask(model, adapter, pattern.keep_masks()):
            pruned = evaluate(model, [doc], tokenizer=tok, max_tokens=512)
        losses.append(math.exp(pruned.nll - full.nll) - 1)
    assert min(losses) <= report.predicted_loss <= max(losses), (report.predicted_loss, losses)


# ---------------------------------------------------------------------- min_mass
@pytest.mark.parametrize("strategy", ["uniform", "global"])
def test_min_mass_is_the_smallest_legal_budget(domains, strategy):
    prof = domains["legal"][1]
    for target in (0.5, 0.9, 0.98, 0.999, 1.0):
        pattern, report = select_for_target(prof, min_mass=target, strategy=strategy)
        legal = legal_budgets(prof, strategy)
        if strategy == "uniform":  # an independent path: Profile.select and diagnose
            mass = {b: diagnose(prof, prof.select(keep=b)).mean_mass_kept for b in legal}
        else:
            mass = {b: diagnose(prof, pattern_at(prof, b, "easy_ep", "global")).mean_mass_kept for b in legal}
        assert mass[report.budget] >= target - 1e-12
        below = [b for b in legal if b < report.budget]
        assert all(mass[b] < target for b in below), (target, report.budget)
        assert report.mass_kept == pytest.approx(diagnose(prof, pattern).mean_mass_kept)
        assert pattern.n_kept == (report.budget * len(pattern.kept) if strategy == "uniform" else report.budget)


def test_budgets_respect_group_constraints():
    from tiny import char_tokenizer, tiny_model

    model = tiny_model("deepseek_v3")
    prof = profile(model, ["hello world", "def f(x): return x", "in the beginning"], tokenizer=char_tokenizer())
    groups = prof.meta["groups"]
    assert groups and groups["n_group"] == 2
    # top-2 from 1 of 2 groups: each group must be able to serve both picks, so 2 per group at least
    assert legal_budgets(prof, "uniform") == [4, 6, 8]
    assert legal_budgets(prof, "global") == list(range(4 * 2, 8 * 2 + 1, 2))
    assert candidate_budgets(prof, "uniform") == [4, 6]
    with pytest.raises(MoepruneError, match="groups"):
        candidate_budgets(prof, "uniform", [5])
    with pytest.raises(MoepruneError, match="minimum"):
        candidate_budgets(prof, "uniform", [2])
    for target in (0.3, 0.7, 0.95):
        pattern, report = select_for_target(prof, min_mass=target)
        assert report.budget in legal_budgets(prof, "uniform")
        for ids in pattern.kept.values():  # equal count per group
            assert sum(e < 4 for e in ids) == sum(e >= 4 for e in ids)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw, match", [
    (dict(max_loss=-0.01), "out of range"), (dict(max_loss=1.0), "out of range"), (dict(max_loss=1.5), "out of range"),
    (dict(max_loss="abc"), "percentage"), (dict(max_loss=float("nan")), "must be a number"),
    (dict(max_loss=True), "must be a number"), (dict(max_loss=[0.1]), "must be a number"),
    (dict(min_mass=0.0), "out of range"), (dict(min_mass=1.01), "out of range"), (dict(min_mass="x%"), "percentage"),
    (dict(max_loss=0.02, min_mass=0.98), "exactly one"), (dict(), "exactly one"),
])
def test_bad_targets_refuse_in_one_line(demo, domains, kw, match):
    model, tok = demo
    prompts, prof = domains["legal"]
    with pytest.raises(MoepruneError, match=match) as e:  # before any measurement
        select_for_target(prof, model, prompts, tokenizer=tok, **kw)
    assert "\n" not in str(e.value)


def test_parse_fraction():
    assert parse_fraction("2%") == pytest.approx(0.02)
    assert parse_fraction(" 0.02 ") == 0.02
    assert check_target("5%", None) == ("max_loss", pytest.approx(0.05))
    with pytest.raises(MoepruneError, match="percentage"):
        parse_fraction("two")


def test_unreachable_targets_refuse(demo, domains):
    model, tok = demo
    prompts, prof = domains["legal"]
    with pytest.raises(MoepruneError, match="no pruning meets") as e:  # every candidate loses something
        select_for_target(prof, model, prompts, tokenizer=tok, max_loss=0.0, **KW)
    assert "\n" not in str(e.value)
    with pytest.raises(MoepruneError, match="too few"):
        select_for_target(prof, model, prompts, tokenizer=tok, max_loss=0.05, folds=N_PROMPTS + 1)
    with pytest.raises(MoepruneError, match="made from"):  # not the profile's prompts
        select_for_target(prof, model, prompts[:-1], tokenizer=tok, max_loss=0.05, **KW)
    with pytest.raises(MoepruneError, match="needs the model"):
        select_for_target(prof, max_loss=0.05)


# ---------------------------------------------------------------------- CLI
def test_cli_select_and_curve(domains, chosen, tmp_path, capsys):
    prompts, prof = domains["legal"]
    prof.save(tmp_path / "prof")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    common = ["--model", str(DEMO_MODEL), "--prompts", str(data), "--folds", str(FOLDS), "--candidates", "4,8,16",
              "--dtype", "float32"]
    assert main(["select", str(tmp_path / "prof"), "--max-loss", "5%", *common, "-o", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    _, report = chosen("legal", 0.05)
    assert f"budget    {report.budget} experts per layer" in out and "wrote" in out
    saved = json.loads((tmp_path / "p.json").read_text())
    assert all(len(v) == report.budget for v in saved["kept"].values())

    assert main(["select", str(tmp_path / "prof"), "--min-mass", "0.98", "-o", str(tmp_path / "m.json")]) == 0
    assert "routing mass kept >= 98.00%" in capsys.readouterr().out

    for bad in (["--max-loss", "150%", *common], ["--max-loss", "lots", *common], ["--keep", "0.5", "--min-mass", "0.9"],
                ["--max-loss", "2%"], ["--min-mass", "2%", "--max-loss", "2%"]):
        assert main(["select", str(tmp_path / "prof"), *bad, "-o", str(tmp_path / "bad.json")]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("moeprune: error:"), err
    assert not (tmp_path / "bad.json").exists()

    png = tmp_path / "curve.png"
    eval_data = DEMO_DATA / "legal.eval.jsonl"
    assert main(["curve", str(DEMO_MODEL), "--profile", str(tmp_path / "prof"), "--prompts", str(data), "--data",
                 str(eval_data), "--criteria", "easy_ep,frequency", "--strategies", "uniform", "--fractions", "4,16",
                 "--folds", "2", "--max-tokens", "256", "--data-tokens", "512", "--dtype", "float32",
                 "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(png.with_suffix(".json").read_text())
    rows = table["rows"]
    assert [(r["criterion"], r["budget"]) for r in rows] == [("easy_ep", 4), ("easy_ep", 16), ("frequency", 4),
                                                            ("frequency", 16)]
    for r in rows:
        assert r["heldout_ratio"] > 0 and r["data_ratio"] > 0 and r["model_bytes"] < table["full"]["model_bytes"]
        assert r["heldout_min"] <= r["heldout_ratio"] <= r["heldout_max"]
    by = {(r["criterion"], r["budget"]): r for r in rows}
    assert by["easy_ep", 4]["data_ratio"] > by["easy_ep", 16]["data_ratio"]
    assert "held-out" in out and "wrote" in out
    assert main(["curve", str(DEMO_MODEL), "--profile", str(tmp_path / "prof"), "-o", str(png), "--force"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
