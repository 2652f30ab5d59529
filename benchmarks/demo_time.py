"""How long `moeprune demo` takes, as a user starts it: a fresh process each run.

Baseline, measured in the same run and interleaved: a fresh process that only imports moeprune,
torch and transformers (the floor every command pays). Prints each run, the median and range,
and the ratio of the medians. The log goes to benchmarks/results/.
Run: python benchmarks/demo_time.py [--runs 3] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from _record import add_record_args, record

IMPORTS = "import moeprune, torch, transformers, moeprune.profiler, moeprune.exporter"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{cmd} failed: {r.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    add_record_args(ap)
    args = ap.parse_args()
    with record("demo_time", args.results, args.record):
        demo, floor = [], []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                demo.append(timed([sys.executable, "-m", "moeprune.cli", "demo", "-o", f"{tmp}/out"]))
            floor.append(timed([sys.executable, "-c", IMPORTS]))
            print(f"run {i + 1}/{args.runs}: moeprune demo {demo[-1]:.1f} s; import only {floor[-1]:.1f} s", flush=True)
        md, mf = statistics.median(demo), statistics.median(floor)
        print(f"moeprune demo: median {md:.1f} s, range {min(demo):.1f}-{max(demo):.1f} s over {len(demo)} runs")
        print(f"import floor: median {mf:.1f} s, range {min(floor):.1f}-{max(floor):.1f} s; "
              f"demo / floor {md / mf:.1f}x")


if __name__ == "__main__":
    main()
