"""`moeprune demo` on the bundled model: the quickstart works offline and prints what it measured."""

import pytest
from transformers import AutoConfig

from moeprune import evaluate
from moeprune.cli import main
from moeprune.demo import DEMO_DATA, DEMO_MODEL


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the bundled demo model is not present")
def test_demo_runs_and_keeps_quality(tmp_path, capfd):
    out = tmp_path / "pruned"
    assert main(["demo", "-o", str(out)]) == 0
    text = capfd.readouterr().out
    assert "reloaded with plain AutoModelForCausalLM" in text
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("python", "legal", "bible") and len(parts) >= 4 and "." in parts[1]:
            rows[parts[0]] = (float(parts[1]), float(parts[2]), float(parts[3]))
    assert set(rows) == {"python", "legal", "bible"}
    # README: python 1.002 (the pattern's domain), bible 1.038 (the domain least like it)
    assert rows["python"][2] <= 1.01
    assert rows["bible"][2] > rows["python"][2] + 0.01
    # the printed pruned perplexity is the exported checkpoint's, measured again here
    again = evaluate(out, DEMO_DATA / "python.eval.jsonl", max_tokens=8192, dtype="float32").perplexity
    assert f"{again:.2f}" == f"{rows['python'][1]:.2f}"
    assert AutoConfig.from_pretrained(out).num_experts == 16
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert f"-> {disk / 2**20:.1f} MiB (bf16" in text
    # a second run does not replace the folder without --force, and says so before any work
    assert main(["demo", "-o", str(out)]) == 2
    assert "not empty" in capfd.readouterr().err and (out / "config.json").is_file()
