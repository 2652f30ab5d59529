"""Criteria benchmark on the demo model (same as `moeprune bench-criteria`).

For each of the seven domains: profile its 64 calibration demonstrations (and 8 and 16), select
at 50% and 25% of experts kept with uniform and global strategies for frequency, TCESS, EASY-EP
and REAP, plus random (3 seeds) and a cross-domain baseline, and measure perplexity on the
domain's eval text. Writes criteria.md, criteria.json, criteria_ratio.png, pattern_overlap.png
into the results folder (or `-o`), and the run's log beside them (`--no-record` for a smoke run).

    python benchmarks/criteria.py [--results DIR] [-o DIR] [--quick] [--model DIR] [--corpora ../shared/corpora]
"""

import argparse
import sys

from moeprune.cli import main

from _record import add_record_args, record, results_dir

if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)  # only ours; everything else goes to bench-criteria
    add_record_args(ap)
    ours, args = ap.parse_known_args()
    if "-o" not in args and "--output" not in args:
        # A --quick run must not overwrite the full run's tables and plots; a full run replaces them
        # (the earlier ones stay in git history).
        quick = "--quick" in args
        args += ["-o", str(results_dir(ours.results) / ("criteria-quick" if quick else ""))]
        if not quick and "--force" not in args:
            args.append("--force")
    asks_help = "-h" in args or "--help" in args
    with record("criteria", ours.results, ours.record and not asks_help):
        sys.exit(main(["bench-criteria", *args]))
