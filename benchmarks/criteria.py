"""Criteria benchmark on the demo model (same as `moeprune bench-criteria`).

For each of the seven domains: profile its 64 calibration demonstrations (and 8 and 16), select
at 50% and 25% of experts kept with uniform and global strategies for frequency, TCESS, EASY-EP
and REAP, plus random (3 seeds) and a cross-domain baseline, and measure perplexity on the
domain's eval text. Writes criteria.md, criteria.json, criteria_ratio.png, pattern_overlap.png
into the results folder (or `-o`), and the run's log beside them (`--no-record` for a smoke run).

    python benchmarks/criteria.py [--results DIR] [-o DIR] [--quick] [--model DIR] [--corpora ../shared/corpora]

`--restricted` runs only what the 12.5% / folding question needs, when the full run is too slow
for the machine: frequency and EASY-EP, uniform and global, at 50%, 25% and 12.5% kept, 64
calibration prompts, no random baseline, 4096 eval tokens per domain (2048 calibration tokens to
choose the folding similarity), folded against plain for both criteria and strategies. Its tables
go to results/criteria-125/ (the full run's stay where they are).
"""

import argparse
import sys

from moeprune.cli import main

from _record import add_record_args, record, results_dir

if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)  # only ours; everything else goes to bench-criteria
    add_record_args(ap)
    ap.add_argument("--restricted", action="store_true")
    ap.add_argument("--restricted-criteria", default="frequency,easy_ep",
                    help="with --restricted: the criteria to run")
    ap.add_argument("--no-fold", action="store_true", help="with --restricted: no folding comparison")
    ours, args = ap.parse_known_args()
    if "-o" not in args and "--output" not in args:
        # A --quick run must not overwrite the full run's tables and plots; a full run replaces them
        # (the earlier ones stay in git history).
        quick = "--quick" in args
        crit = tuple(c for c in ours.restricted_criteria.split(",") if c)
        tag = "" if crit == ("frequency", "easy_ep") else "-" + "-".join(crit)
        sub = "criteria-quick" if quick else f"criteria-125{tag}" if ours.restricted else ""
        args += ["-o", str(results_dir(ours.results) / sub)]
        if not quick and "--force" not in args:
            args.append("--force")
    asks_help = "-h" in args or "--help" in args
    with record("criteria", ours.results, ours.record and not asks_help):
        if not ours.restricted:
            sys.exit(main(["bench-criteria", *args]))
        from moeprune.bench import BenchConfig, markdown, run_benchmark, write_report
        from moeprune.demo import DEMO_MODEL

        out = args[args.index("-o") + 1] if "-o" in args else str(results_dir(ours.results))
        crit = tuple(c for c in ours.restricted_criteria.split(",") if c)
        cfg = BenchConfig(calib_sizes=(64,), keeps=(0.5, 0.25, 0.125), criteria=crit,
                          random_seeds=(), small_calib_criteria=(), eval_tokens=4096,
                          fold_criteria=() if ours.no_fold else ("easy_ep", "frequency"), fold_calib_tokens=2048)
        result = run_benchmark(DEMO_MODEL, "../shared/corpora", cfg)
        write_report(result, out)
        print(markdown(result))
        print(f"\nrestricted run: wrote {out}/criteria.md, criteria.json and plots in {result['seconds']:.0f} s")
