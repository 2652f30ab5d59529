"""Reduced criteria benchmark on the bundled demo model and real text: orderings, not timings."""

import json
import math

import pytest

from moeprune import MoepruneError
from moeprune.bench import BenchConfig, markdown, run_benchmark, summary, write_report
from moeprune.demo import DEMO_MODEL


@pytest.fixture(scope="module")
def result(request):
    corpora = request.getfixturevalue("shared_corpora")
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("the bundled demo model is not present")
    cfg = BenchConfig(domains=("python", "bible"), calib_sizes=(16,), keeps=(0.5,), strategies=("uniform",),
                      random_seeds=(0, 1), eval_tokens=4096)
    return run_benchmark(DEMO_MODEL, corpora, cfg, progress=False)


def test_informed_criteria_beat_random_on_every_domain(result):
    by = {}
    for r in result["rows"]:
        by.setdefault((r["domain"], r["criterion"]), []).append(r["ratio"])
    for d in result["config"]["domains"]:
        best_random = min(by[d, "random"])
        for c in result["config"]["criteria"]:
            assert by[d, c][0] < best_random, (d, c, by[d, c], best_random)


def test_in_domain_beats_cross_domain(result):
    by = {(r["domain"], r["criterion"]): r["ratio"] for r in result["rows"] if r["seed"] is None}
    for d in result["config"]["domains"]:
        assert by[d, "easy_ep"] < by[d, "cross-domain"], d


def test_report_files(result, tmp_path):
    write_report(result, tmp_path)
    assert json.loads((tmp_path / "criteria.json").read_text()) == json.loads(json.dumps(result))
    for name in ("criteria_ratio.png", "pattern_overlap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = result["config"]
    for r in result["rows"]:
        assert r["ratio"] == pytest.approx(r["ppl"] / result["full"][r["domain"]])
    s = summary(result)
    md = (tmp_path / "criteria.md").read_text()
    assert md.strip() == markdown(result).strip()
    for (criterion, strategy, calib, keep), value in s.items():  # recomputed here from the rows
        ratios = [r["ratio"] for r in result["rows"]
                  if (r["criterion"], r["strategy"], r["calib"], r["keep"]) == (criterion, strategy, calib, keep)]
        per_domain = len(cfg["random_seeds"]) if criterion == "random" else 1
        assert len(ratios) == len(cfg["domains"]) * per_domain
        assert value == pytest.approx(math.exp(sum(map(math.log, ratios)) / len(ratios)))
        if criterion in cfg["criteria"]:
            assert f"| {criterion} | {strategy} | {value:.3f} |" in md
    for d in cfg["domains"]:
        assert f"| {d} | {result['full'][d]:.2f} |" in md


def test_streamed_benchmark_equals_the_loaded_one(request):
    """stream=True profiles and evaluates from the checkpoint layer by layer (each pruned model as the
    slim model): the same rows as keep-masks on the loaded model, to float32 rounding."""
    corpora = request.getfixturevalue("shared_corpora")
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("the bundled demo model is not present")
    kw = dict(domains=("python",), calib_sizes=(8,), keeps=(0.25,), strategies=("uniform",), criteria=("easy_ep",),
              random_seeds=(0,), eval_tokens=1024)
    loaded = run_benchmark(DEMO_MODEL, corpora, BenchConfig(**kw), progress=False)
    streamed = run_benchmark(DEMO_MODEL, corpora, BenchConfig(**kw, stream=True), progress=False)
    assert streamed["full"]["python"] == pytest.approx(loaded["full"]["python"], rel=1e-5)
    assert [r["kept_per_layer"] for r in streamed["rows"]] == [r["kept_per_layer"] for r in loaded["rows"]]
    for a, b in zip(loaded["rows"], streamed["rows"], strict=True):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5), (a["criterion"], a["ppl"], b["ppl"])
    with pytest.raises(MoepruneError, match="cannot run streamed"):
        run_benchmark(DEMO_MODEL, corpora, BenchConfig(**kw, stream=True, fold_criteria=("easy_ep",)))
