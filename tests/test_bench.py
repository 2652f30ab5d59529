"""Reduced criteria benchmark on the bundled demo model and real text: orderings, not timings."""

import pytest

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
    for name in ("criteria.md", "criteria.json", "criteria_ratio.png", "pattern_overlap.png"):
        assert (tmp_path / name).is_file()
    text = markdown(result)
    assert "easy_ep" in text and "random" in text
    assert all(v > 0 for v in summary(result).values())
