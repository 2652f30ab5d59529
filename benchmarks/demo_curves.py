"""The quality/memory curve (`moeprune curve`) of the bundled demo model for two domains.

For python and legal: profile the domain's 16 bundled calibration prompts (up to 256 tokens each),
then `moeprune curve` with those prompts (k-fold held-out perplexity ratio) and the domain's bundled
held-out text (`--data`), for easy_ep, reap and frequency, uniform and global, at 1-24 of 32 experts.
Writes benchmarks/results/curve_<domain>.png and .json; the printed tables go to the run's log.

Run: python benchmarks/demo_curves.py [--no-record]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from moeprune.cli import main as cli
from moeprune.demo import DEMO_DATA, DEMO_MODEL

from _record import add_record_args, record, results_dir

DOMAINS = ("python", "legal")


def run(out: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for d in DOMAINS:
            prompts = str(DEMO_DATA / f"{d}.calib.jsonl")
            args = ["profile", str(DEMO_MODEL), "--prompts", prompts, "--domain", d, "-o", f"{tmp}/{d}",
                    "--max-length", "256", "-q"]
            print("$ moeprune", " ".join(args), flush=True)
            if cli(args):
                return 1
            args = ["curve", str(DEMO_MODEL), "--profile", f"{tmp}/{d}", "--prompts", prompts,
                    "--data", str(DEMO_DATA / f"{d}.eval.jsonl"), "-o", str(out / f"curve_{d}.png"), "--force"]
            print("$ moeprune", " ".join(args), flush=True)
            if cli(args):
                return 1
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_record_args(ap)
    a = ap.parse_args()
    with record("demo_curves", a.results, a.record):
        raise SystemExit(run(results_dir(a.results) if a.record else Path(tempfile.mkdtemp())))
