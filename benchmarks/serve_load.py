"""Load test of `moeprune serve` on loopback, over the demo model and a store of three domains.

1. Mixed load: 16 concurrent clients send a stream of prompts from three domains (Python,
   licence texts, the Bible; bundled demo data) until `--requests` have been answered; each
   request is retrieved to its pattern. Throughput (requests/s, generated tokens/s), p50/p99
   latency, failures, and what the pool loaded.
2. Batching: the same pinned pattern from 1 client (8 requests), then from 8 concurrent clients
   (6 requests each, so that the steady state dominates): generated tokens/s of each, `--rounds`
   interleaved rounds; every round's ratio is printed, then their median and range.
3. Pattern switch: pinned requests alternating between two patterns: bytes read and the extra
   latency of a switch, against `load_slim` of the same pattern from a cold page cache.
4. Memory: peak RSS of the server process at a 50% expert budget and with every expert.
5. A queue that fills: 16 clients against `--max-queue 4`; answered requests, 429s (counted
   apart: the server refusing work it has no room for, as it should) and failures (anything else).

The log goes to benchmarks/results/ (`--no-record` for a smoke run).

    python benchmarks/serve_load.py [--requests 96] [--max-tokens 32] [--rounds 5] [--memory-model DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

from moeprune.demo import DEMO_DATA, DEMO_MODEL

from _record import add_record_args, record

DOMAINS = ("python", "legal", "bible")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(path: Path, model_dir: Path = DEMO_MODEL, max_prompts: int = 16) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.prompts import read_prompts
    from moeprune.store import PatternStore

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if model_dir == DEMO_MODEL
                                                 else torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    store = PatternStore(path)
    for d in DOMAINS:
        prof = moeprune.profile(model, read_prompts(DEMO_DATA / f"{d}.calib.jsonl")[:max_prompts], tokenizer=tok,
                                domain=d, max_length=128 if model_dir != DEMO_MODEL else 256)
        store.add(d, prof, prof.select(keep=0.5), rebuild=False)
    store.rebuild_index()


def add_char_tokenizer(model_dir: Path) -> None:
    """A character-level tokenizer for a checkpoint that has none (the synthetic benchmark models)."""
    if (model_dir / "tokenizer.json").exists():
        return
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(c): c - 28 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(model_dir)


class Server:
    def __init__(self, store: Path, budget: str, max_batch: int = 8, max_queue: int = 256,
                 model_dir: Path = DEMO_MODEL):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "serve", str(model_dir), "--store",
                                      str(store), "--port", str(self.port), "--expert-budget", budget,
                                      "--max-batch", str(max_batch), "--max-queue", str(max_queue)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3000):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")), 0.0))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


def prompts() -> dict[str, list[str]]:
    import json

    out = {}
    for d in DOMAINS:
        with open(DEMO_DATA / f"{d}.eval.jsonl") as f:
            texts = [json.loads(line)["text"] for line in f]
        out[d] = [t[i : i + 300] for t in texts for i in range(0, min(len(t), 1200), 300) if len(t[i : i + 300]) > 50]
    return out


def run_clients(url: str, jobs: list[dict], clients: int, refused: list[int] | None = None
                ) -> tuple[list[float], int, int, float]:
    """Send `jobs` from `clients` threads; (latencies, generated tokens, failures, wall seconds).
    A 429 (queue full) is counted in `refused`, not as a failure, when a list is given for it."""
    lock = threading.Lock()
    queue = list(jobs)
    lat: list[float] = []
    tokens = [0]
    failures = [0]

    def worker():
        with httpx.Client(timeout=300) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    elif r.status_code == 429 and refused is not None:
                        refused.append(1)
                    else:
                        failures[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, tokens[0], failures[0], time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--memory-model", type=Path, default=None,
                    help="also measure peak RSS on this (large) checkpoint, e.g. slim_load.py's Mixtral folder")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the batching measurement")
    add_record_args(ap)
    args = ap.parse_args()
    with record("serve_load", args.results, args.record):
        run(args)


def run(args: argparse.Namespace) -> None:
    texts = prompts()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        build_store(store)

        # 1. mixed load, 50% budget
        srv = Server(store, "0.5")
        mixed = [{"prompt": texts[DOMAINS[i % 3]][i // 3 % len(texts[DOMAINS[i % 3]])], "max_tokens": args.max_tokens,
                  "temperature": 0} for i in range(args.requests)]
        lat, toks, fails, wall = run_clients(srv.url, mixed, 16)
        print(f"mixed load, 16 clients, {args.requests} requests of {args.max_tokens} tokens, budget 50%:")
        print(f"  {len(lat) / wall:.2f} requests/s, {toks / wall:.1f} generated tokens/s, latency p50 "
              f"{pct(lat, 0.5):.2f} s p99 {pct(lat, 0.99):.2f} s, failed {fails}")
        print(f"  pool: {srv.metric('moeprune_expert_loads'):.0f} expert loads, "
              f"{srv.metric('moeprune_expert_evictions'):.0f} evictions, "
              f"{srv.metric('moeprune_expert_bytes_read') / 2**20:.1f} MiB read")

        # 2. batching: one client against eight, same pinned pattern
        same = [{"model": "demo_model:python", "prompt": texts["python"][i % 16], "max_tokens": args.max_tokens,
                 "temperature": 0} for i in range(48)]
        ratios, failed = [], 0
        print(f"same pattern (python, pinned), 1 client x 8 requests vs 8 clients x 6 requests, {args.rounds} rounds:")
        for i in range(args.rounds):  # interleaved: each round's ratio compares neighbours in time
            _, t1, f1, w1 = run_clients(srv.url, same[:8], 1)
            _, t8, f8, w8 = run_clients(srv.url, same, 8)  # 6 requests per client: the steady state
            ratios.append((t8 / w8) / (t1 / w1))
            failed += f1 + f8
            print(f"  round {i + 1}: 1 client {t1 / w1:.0f} tokens/s, 8 clients {t8 / w8:.0f} tokens/s: "
                  f"{ratios[-1]:.2f}x (failed {f1 + f8})", flush=True)
        print(f"  batching ratio 8 clients / 1 client: median {statistics.median(ratios):.2f}x, range "
              f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds (failed {failed}; target >= 2.5x)")

        # 3. pattern switch cost
        def timed(model: str) -> tuple[float, float]:
            b0 = srv.metric("moeprune_expert_bytes_read")
            t0 = time.perf_counter()
            httpx.post(f"{srv.url}/v1/completions", timeout=60,
                       json={"model": model, "prompt": "x", "max_tokens": 1, "temperature": 0})
            return time.perf_counter() - t0, srv.metric("moeprune_expert_bytes_read") - b0

        switches, stays = [], []
        for i in range(6):
            a, b = ("demo_model:python", "demo_model:bible") if i % 2 == 0 else ("demo_model:bible", "demo_model:python")
            timed(a)
            stays.append(timed(a))
            switches.append(timed(b))
        sw_ms = statistics.median(t for t, _ in switches) * 1e3
        st_ms = statistics.median(t for t, _ in stays) * 1e3
        sw_bytes = statistics.median(b for _, b in switches)
        rss_half = srv.peak_rss_mib()
        code_half = srv.stop()

        from moeprune import load_slim
        from moeprune.store import PatternStore

        pattern = PatternStore(store).get("bible").pattern
        load_slim(DEMO_MODEL, pattern)  # warm-up: the first call imports the model class; a server would not pay it
        for f in DEMO_MODEL.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t0 = time.perf_counter()
        slim = load_slim(DEMO_MODEL, pattern)
        reload_ms = (time.perf_counter() - t0) * 1e3
        reload_bytes = slim.moeprune_load_report.bytes_read
        print(f"pattern switch (python <-> bible, budget 50%): {sw_bytes / 2**20:.2f} MiB read, request "
              f"{sw_ms:.0f} ms vs {st_ms:.0f} ms without a switch (+{sw_ms - st_ms:.0f} ms; medians of {len(switches)}, "
              f"ranges {min(t for t, _ in switches) * 1e3:.0f}-{max(t for t, _ in switches) * 1e3:.0f} and "
              f"{min(t for t, _ in stays) * 1e3:.0f}-{max(t for t, _ in stays) * 1e3:.0f} ms); reloading a slim "
              f"model instead: {reload_bytes / 2**20:.2f} MiB, {reload_ms:.0f} ms")

        # 4. memory against serving every expert
        srv_full = Server(store, "1.0")
        run_clients(srv_full.url, mixed[:24], 16)
        rss_full = srv_full.peak_rss_mib()
        code_full = srv_full.stop()
        srv_half = Server(store, "0.5")
        run_clients(srv_half.url, mixed[:24], 16)
        rss_half2 = srv_half.peak_rss_mib()
        srv_half.stop()
        print(f"peak RSS: budget 50% {rss_half2:.0f} MiB (first run {rss_half:.0f}), all experts {rss_full:.0f} MiB: "
              f"{rss_half2 / rss_full:.3f}x")
        print(f"server exit codes after Ctrl-C: {code_half}, {code_full}")

        # 5. a queue that can fill: more clients than the queue holds
        srv_q = Server(store, "0.5", max_queue=4)
        refused: list[int] = []
        lat, toks, fails, wall = run_clients(srv_q.url, mixed[:48], 16, refused)
        served = srv_q.metric('moeprune_requests_total{endpoint="/v1/completions",status="200"}')
        counted = srv_q.metric('moeprune_requests_total{endpoint="/v1/completions",status="429"}')
        code_q = srv_q.stop()
        print(f"queue of 4, 16 clients, 48 requests: {len(lat)} answered, {len(refused)} refused with 429 "
              f"(the server's own count: {served:.0f} answered, {counted:.0f} refused), failed {fails}; "
              f"answered latency p50 {pct(lat, 0.5):.2f} s p99 {pct(lat, 0.99):.2f} s; exit code {code_q}")

        if args.memory_model:
            add_char_tokenizer(args.memory_model)
            big_store = Path(tmp) / "big-store"
            build_store(big_store, args.memory_model, max_prompts=4)
            size = sum(f.stat().st_size for f in args.memory_model.glob("*.safetensors"))
            rss = {}
            for budget in ("0.5", "1.0"):
                srv = Server(big_store, budget, model_dir=args.memory_model)
                run_clients(srv.url, [{"prompt": t[:100], "max_tokens": 4, "temperature": 0}
                                      for d in DOMAINS for t in texts[d][:2]], 3)
                rss[budget] = srv.peak_rss_mib()
                srv.stop()
            print(f"{args.memory_model.name} ({size / 2**30:.2f} GiB bf16): peak RSS budget 50% {rss['0.5']:.0f} MiB, "
                  f"all experts {rss['1.0']:.0f} MiB: {rss['0.5'] / rss['1.0']:.3f}x")


if __name__ == "__main__":
    main()
