"""Where a streamed profile's peak memory goes, layer by layer, at several batch sizes.

On the stream benchmark's checkpoint (benchmarks/stream_profile.py's 6.1 GB Mixtral layout, generated there),
each batch size runs in a fresh process: a thread samples VmRSS every 0.5 ms while `moeprune.profile`
streams the checkpoint, and around each decoder layer the process records the RSS just before the layer
is freed (by then: the floor, the layer, and the next layer read ahead) and the highest RSS sampled while
the layer ran. Their difference is the working memory of the forward: activations, and the kernels'
temporaries. Printed per batch size: the median and range over layers (the first layer and the last,
which has nothing to read ahead, left out), what the process holds just before a layer is freed beyond
the floor and two layers (run state: hidden states, each layer's arguments, the recorder; heap kept after
frees), and the peak of the whole call above the RSS before it.

    python benchmarks/stream_peak.py [--dir DIR] [--batch-sizes 2,8,32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from slim_load import _status
from stream_profile import DEFAULT_DIR, N_PROMPTS, make_prompts

from _record import add_record_args, record


def rss_mib() -> float:
    return _status("VmRSS") / 2**20


def child(folder: str, batch_size: int, prompts: list[str]) -> dict:
    import moeprune
    from moeprune import stream

    peak = [0.0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    layers: list[tuple[float, float]] = []
    free = stream.LayerStream._free

    def watched_free(self, module):
        if module is not self.model and module is not self.model.get_input_embeddings():
            layers.append((rss_mib(), peak[0]))
        free(self, module)
        peak[0] = rss_mib()  # the next layer's peak is sampled from here

    stream.LayerStream._free = watched_free
    moeprune.profile(folder, prompts[:2], batch_size=batch_size)  # the floor: code, kernels, thread pools
    layers.clear()
    before = rss_mib()
    peak[0] = before
    prof = moeprune.profile(folder, prompts, batch_size=batch_size)
    call_peak = max(p for _, p in layers) if layers else peak[0]
    return {"before": before, "layers": layers, "call_peak": call_peak,
            "layer_mib": prof.meta["stream"]["largest_layer"] / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=DEFAULT_DIR)
    ap.add_argument("--batch-sizes", default="2,8,32")
    ap.add_argument("--child", nargs=2, metavar=("BATCH", "PROMPTS"), help=argparse.SUPPRESS)
    add_record_args(ap)
    args = ap.parse_args()
    if args.child:
        out = child(args.dir, int(args.child[0]), json.loads(Path(args.child[1]).read_text()))
        print("RESULT " + json.dumps(out))
        return 0
    if not (Path(args.dir) / "config.json").is_file():
        print(f"no checkpoint at {args.dir}: run benchmarks/stream_profile.py first (it generates it)", file=sys.stderr)
        return 2
    with record("stream_peak", args.results, args.record):
        return run(args)


def run(args) -> int:
    import tempfile

    prompts, source = make_prompts(N_PROMPTS, 40)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    print(f"checkpoint {args.dir}; {len(prompts)} prompts of 40 characters from {source}; batch sizes {args.batch_sizes}\n")
    print("| batch size | held before a layer is freed, above floor + 2 layers (MiB) | working memory while a layer "
          "runs (MiB) | peak above the floor (MiB) | in layers |")
    print("|---:|---:|---:|---:|---:|")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        proc = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--child", str(bs), f.name],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            return 1
        r = json.loads(line[7:])
        inner = r["layers"][1:-1]
        extra = [p - level for level, p in inner]
        held = [level - r["before"] - 2 * r["layer_mib"] for level, _ in inner]
        above = r["call_peak"] - r["before"]
        print(f"| {bs} | {statistics.median(held):.1f} [{min(held):.1f}-{max(held):.1f}] | "
              f"{statistics.median(extra):.1f} [{min(extra):.1f}-{max(extra):.1f}] | {above:.0f} | "
              f"{above / r['layer_mib']:.2f} |", flush=True)
    print("\nmedian [range] over the decoder layers but the first and the last; the floor is the RSS before the "
          "call, after a two-prompt profile of the same checkpoint in the same process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
