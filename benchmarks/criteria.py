"""Criteria benchmark on the demo model (same as `moeprune bench-criteria`).

For each of the seven domains: profile its 64 calibration demonstrations (and 8 and 16), select
at 50% and 25% of experts kept with uniform and global strategies for frequency, TCESS, EASY-EP
and REAP, plus random (3 seeds) and a cross-domain baseline, and measure perplexity on the
domain's eval text. Writes criteria.md, criteria.json, criteria_ratio.png, pattern_overlap.png.

    python benchmarks/criteria.py [-o benchmarks/results] [--model DIR] [--corpora ../shared/corpora]
"""

import sys

from moeprune.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "-o" not in args and "--output" not in args:
        args += ["-o", "benchmarks/results"]
    sys.exit(main(["bench-criteria", *args]))
