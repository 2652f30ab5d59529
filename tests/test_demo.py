"""`moeprune demo` on the bundled model: the quickstart works offline."""

import pytest

from moeprune.cli import main
from moeprune.demo import DEMO_MODEL


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the bundled demo model is not present")
def test_demo_runs_and_keeps_quality(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "pruned")]) == 0
    out = capsys.readouterr().out
    assert "reloaded with plain AutoModelForCausalLM" in out and "memory: parameters" in out
    line = next(x for x in out.splitlines() if "the pattern's domain" in x)
    full, pruned, ratio = (float(v) for v in line.split()[1:4])
    assert ratio < 1.15 and pruned == pytest.approx(full * ratio, rel=1e-2)
    assert (tmp_path / "pruned" / "config.json").is_file() and (tmp_path / "pruned" / "README.md").is_file()
