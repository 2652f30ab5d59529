"""Pattern-store search latency, and the cost of a query's signature against a full forward.

1. Latency: stores of 1k, 10k and 100k synthetic signature vectors of the demo model's real
   dimensions (router: its expert count; hidden: its hidden size), 100 demonstrations per pattern
   drawn around random pattern centres; flat (exact) and HNSW (approximate) FAISS indexes.
   Times `PatternStore.search` with a precomputed query vector (index search + voting + the
   pattern lookup), p50 and p99 over 2000 queries, and the top-1 agreement of HNSW with flat.
2. Signature cost: on the bundled demo model, the time to embed a batch of queries (first 512
   characters of eval documents; the forward stops at the first MoE router) over the time of one
   full forward of the same batch, 15 interleaved runs: ratio of the medians, and the median and
   range of the paired (back-to-back) ratios.

The log goes to benchmarks/results/ (`--no-record` for a smoke run).

    python benchmarks/store_search.py [--sizes 1000 10000 100000] [--queries 2000] [--signature-runs 15]
        [--corpora ../shared/corpora]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import moeprune.store.store as store_mod
from moeprune.profiles import STATS, Profile
from moeprune.store import PatternStore

from _record import add_record_args, record

PER_PATTERN = 100


def build_store(path: Path, n_vectors: int, dim: int, approximate: bool, seed: int = 0
                ) -> tuple[PatternStore, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = []
    n_patterns = max(1, n_vectors // PER_PATTERN)
    store_mod.FLAT_LIMIT = 0 if approximate else 10**9  # force the index kind for the comparison
    store = PatternStore(path)
    for p in range(n_patterns):
        centre = rng.normal(size=dim)
        centres.append(centre)
        sigs = torch.tensor(centre + 0.3 * rng.normal(size=(PER_PATTERN, dim)), dtype=torch.float32)
        stats = {k: torch.rand(2, 8, dtype=torch.float64) for k in STATS}
        meta = {"model_type": "qwen3_moe", "fingerprint": "sha256:bench", "domain": f"d{p}", "n_prompts": PER_PATTERN,
                "n_tokens": 1000, "moe_layers": [0, 1], "num_experts": 8, "top_k": 2, "groups": None}
        prof = Profile(stats, sigs, meta, None, sigs)
        store.add(f"p{p}", prof, prof.select(keep=0.5, criterion="frequency"), rebuild=False)
    store.rebuild_index()
    return store, np.stack(centres)


def latency(store: PatternStore, centres: np.ndarray, n: int = 2000) -> tuple[float, float, list[str]]:
    """Queries drawn like the demonstrations (a random pattern's centre plus the same noise)."""
    rng = np.random.default_rng(1)
    picks = rng.integers(len(centres), size=n)
    queries = [torch.tensor(centres[i] + 0.3 * rng.normal(size=centres.shape[1]), dtype=torch.float32)
               for i in picks]
    store.search(queries[0])  # load the index
    times, names = [], []
    for q in queries:
        t0 = time.perf_counter()
        m = store.search(q)
        times.append(time.perf_counter() - t0)
        names.append(m.name)
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3, names


def signature_cost(corpora: Path, runs: int = 15) -> tuple[float, float, float, list[float]]:
    """(full forward ms, signature ms, ratio of medians, sorted paired ratios)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune.demo import DEMO_MODEL
    from moeprune.store.signature import embed

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    with open(corpora / "python" / "eval.jsonl") as f:
        texts = [json.loads(line)["text"][:512] for _, line in zip(range(8), f, strict=False)]
    enc = tok(texts, padding=True, return_tensors="pt")

    def full():
        with torch.no_grad():
            model(**enc, use_cache=False)

    def sig():
        embed(model, tok, texts, kind="router")

    for f in (full, sig, full, sig):
        f()
    tf, ts = [], []
    for _ in range(runs):
        for f, acc in ((full, tf), (sig, ts)):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    a, b = statistics.median(tf), statistics.median(ts)
    return a * 1e3, b * 1e3, b / a, sorted(y / x for x, y in zip(tf, ts, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--corpora", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpora"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=2000, help="timed searches per store")
    ap.add_argument("--signature-runs", type=int, default=15, help="interleaved runs of the signature cost")
    add_record_args(ap)
    args = ap.parse_args()
    with record("store_search", args.results, args.record):
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time: threading only adds overhead
    from transformers import AutoConfig

    from moeprune import get_adapter
    from moeprune.demo import DEMO_MODEL

    config = AutoConfig.from_pretrained(DEMO_MODEL)
    dims = {"router": get_adapter(config).num_experts(config), "hidden": config.hidden_size}
    print("| vectors | signature (dim) | index | p50 ms | p99 ms | top-1 = flat |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        for kind, dim in dims.items():
            results = {}
            for approx in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    store, centres = build_store(Path(tmp) / "s", n, dim, approx)
                    results[approx] = latency(store, centres, args.queries)
            agree = np.mean([a == b for a, b in zip(results[False][2], results[True][2], strict=True)])
            for approx in (False, True):
                p50, p99, _ = results[approx]
                label = "HNSW (approximate)" if approx else "flat (exact)"
                print(f"| {n:,} | {kind} ({dim}) | {label} | {p50:.3f} | {p99:.3f} | "
                      f"{'-' if not approx else f'{agree:.1%}'} |", flush=True)
    corpora = Path(args.corpora)
    if (corpora / "python" / "eval.jsonl").is_file() and (DEMO_MODEL / "config.json").is_file():
        full_ms, sig_ms, ratio, pairs = signature_cost(corpora, args.signature_runs)
        print(f"\nsignature of 8 queries (<=512 chars): {sig_ms:.1f} ms; full forward of the same batch: "
              f"{full_ms:.1f} ms (medians of {len(pairs)} runs); ratio of medians {ratio:.3f}x; paired ratios "
              f"median {statistics.median(pairs):.3f}x, range {pairs[0]:.3f}-{pairs[-1]:.3f}x (target <= 0.3x)")
    else:
        print("\n(signature cost skipped: corpora or demo model missing)")


if __name__ == "__main__":
    main()
