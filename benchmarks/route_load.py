"""Load test of the routing front (`moeprune route`) over vLLM's CPU build, on loopback.

Builds the demo store (python, legal, bible; keep 0.5) and deploys, with
`moeprune.serve.deploy.Deployment`, vLLM servers for the python and legal patterns plus the full-model
fallback (engine and arguments as benchmarks/route_check.py: vLLM from `--vllm-python`, float32,
eager, max-model-len 512, VLLM_CPU_KVCACHE_SPACE=1), and runs the front in this process.

(a) Added latency. Retrieval: `Router.choose` timed directly on held-out prompts of the three domains
    (`--latency-requests` calls), and the front's own `moeprune_retrieval_seconds` histogram after (b).
    Proxying: the same pinned request (`demo_model:python`, 1 token) through the front and straight to
    the python upstream, alternated, `--latency-requests` each, one keep-alive client each; overhead =
    front minus direct at p50 and p99, and the median of the paired differences.
    Targets at p50: retrieval <= 20 ms, proxying <= 5 ms.
(b) `--clients` concurrent clients send `--requests` greedy completions (`--max-tokens` each) from the
    three domains through the front (retrieved, not pinned): failures = any non-200 answer.
(c) The same requests, same clients, against `moeprune serve demo_model --store STORE` (default
    flags: every expert held, max batch 8), interleaved with the front over `--rounds` rounds:
    generated tokens/s of each and their ratio.
(d) Memory of each vLLM server: VmRSS summed over its process tree (API server, engine core, worker),
    vLLM's own weight lines from its log, against the size of its export on disk; and the RSS of
    `moeprune serve` for comparison.

For timing the run waits (60 s between checks, `--max-wait` in all) until the 1-minute load average is
below `--max-load`, then runs anyway and says so. The log goes to benchmarks/results/route_load-<date>.txt
(`--no-record` for a smoke run).

    python benchmarks/route_load.py [--requests 96] [--max-tokens 32] [--latency-requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
from route_check import DOMAINS, MODEL_NAME, VLLM_PYTHON, Front, build_store, eval_texts, start_deployment
from serve_load import Server as MoepruneServer

from moeprune.demo import DEMO_MODEL

from _record import add_record_args, record

RETRIEVAL_TARGET_MS = 20.0
PROXY_TARGET_MS = 5.0


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs) + 0.5)) - 1))]


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait: float) -> None:
    t0 = time.monotonic()
    while load1() >= max_load:
        if time.monotonic() - t0 >= max_wait:
            print(f"NOTE: 1-minute load average still {load1():.2f} (>= {max_load}) after waiting "
                  f"{time.monotonic() - t0:.0f} s; running anyway, timings are on a busy machine", flush=True)
            return
        print(f"load average {load1():.2f} >= {max_load}: waiting 60 s", flush=True)
        time.sleep(60)
    print(f"load average {load1():.2f} < {max_load} after waiting {time.monotonic() - t0:.0f} s", flush=True)


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {cpu}, RAM {ram:.1f} GiB, {platform.platform()}"


def query_texts(n_per_domain: int = 8) -> list[tuple[str, str]]:
    """(domain, text) of held-out prompts, domains interleaved."""
    texts = eval_texts()
    return [(d, texts[d][i % len(texts[d])]) for i in range(n_per_domain) for d in DOMAINS]


# ---------------------------------------------------------------------------------------------- (a)
def retrieval_latency(front: Front, n: int) -> list[float]:
    queries = query_texts()
    for _, q in queries[:6]:  # warm-up
        front.router.choose(None, [q])
    out = []
    for i in range(n):
        q = queries[i % len(queries)][1]
        t0 = time.perf_counter()
        front.router.choose(None, [q])
        out.append(time.perf_counter() - t0)
    return out


def proxy_latency(front: Front, direct_url: str, n: int) -> dict[str, list[float]]:
    """The same 1-token request through the front pinned (`demo_model:python`), through the front
    retrieved (`demo_model`, routed to python), and straight to the python upstream, in rotating order."""
    prompt = eval_texts()["python"][0]
    targets = {"pinned": (f"{front.url}/v1/completions", f"{MODEL_NAME}:python"),
               "retrieved": (f"{front.url}/v1/completions", MODEL_NAME),
               "direct": (f"{direct_url}/completions", "python")}
    out: dict[str, list[float]] = {k: [] for k in targets}
    clients = {k: httpx.Client(timeout=60) for k in targets}  # keep-alive, one connection each

    def one(key: str) -> float:
        url, model = targets[key]
        t0 = time.perf_counter()
        r = clients[key].post(url, json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{url} ({model}): {r.status_code} {r.text[:200]}")
        if key == "retrieved" and r.headers.get("x-moeprune-upstream") != "python":
            raise RuntimeError(f"the python prompt was routed to {r.headers.get('x-moeprune-upstream')}")
        return dt

    try:
        keys = list(targets)
        for _ in range(10):  # warm-up (connections, vLLM's first requests)
            for k in keys:
                one(k)
        for i in range(n):
            for k in keys[i % 3:] + keys[:i % 3]:
                out[k].append(one(k))
    finally:
        for c in clients.values():
            c.close()
    return out


def histogram(text: str, name: str) -> tuple[float, float, list[tuple[float, float]]]:
    """(count, sum, [(le, cumulative count)]) of a Prometheus histogram in /metrics text."""
    count = total = 0.0
    buckets = []
    for line in text.splitlines():
        if line.startswith(f"{name}_count"):
            count = float(line.split()[-1])
        elif line.startswith(f"{name}_sum"):
            total = float(line.split()[-1])
        elif line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    return count, total, buckets


def bucket_quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float:
    return next((le for le, c in buckets if c >= q * count), float("nan"))


# ---------------------------------------------------------------------------------------------- (b), (c)
def run_clients(url: str, jobs: list[dict], clients: int) -> dict:
    """Send `jobs` from `clients` threads to url/v1/completions; `answers` holds each job's JSON answer (the
    error text for a non-200, None when the request failed), in job order."""
    lock = threading.Lock()
    queue = list(enumerate(jobs))[::-1]
    answers: list[dict | None] = [None] * len(jobs)
    lat: list[float] = []
    tokens = [0]
    statuses: dict[str, int] = {}
    routes: dict[str, int] = {}

    def worker():
        with httpx.Client(timeout=900) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    i, body = queue.pop()
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/v1/completions", json=body)
                    status, data = str(r.status_code), (r.json() if r.status_code == 200 else {"error": r.text[:300]})
                except (httpx.HTTPError, ValueError) as e:
                    status, data = type(e).__name__, None
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    answers[i] = data
                    if status == "200":
                        lat.append(dt)
                        tokens[0] += data["usage"]["completion_tokens"]
                        info = data.get("moeprune") or {}
                        key = f"{info.get('pattern')}{'*' if info.get('fell_back') else ''}"
                        routes[key] = routes.get(key, 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    failures = sum(n for s, n in statuses.items() if s != "200")
    return {"lat": lat, "tokens": tokens[0], "wall": wall, "failures": failures, "statuses": statuses,
            "routes": routes, "tps": tokens[0] / wall, "answers": answers}


def describe(name: str, r: dict) -> str:
    return (f"{name}: {len(r['lat'])} answered in {r['wall']:.1f} s, {r['tps']:.1f} generated tokens/s, "
            f"latency p50 {pct(r['lat'], 0.5):.2f} s p99 {pct(r['lat'], 0.99):.2f} s, failures {r['failures']} "
            f"(statuses {r['statuses']})")


# ---------------------------------------------------------------------------------------------- (d)
def tree_rss_kib(pid: int) -> tuple[int, list[tuple[str, int]]]:
    """VmRSS of a process and its descendants (KiB), and (name, KiB) of each."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    each = []
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    each.append((p.name(), int(line.split()[1])))
        except (OSError, psutil.Error):
            pass
    return sum(k for _, k in each), each


def log_lines(log: Path) -> list[str]:
    """vLLM's lines about weights and KV cache from an engine's log (the last run's: the log appends)."""
    keys = ("Model weights took", "Model loading took", "Checkpoint size", "Loading weights took", "for KV cache")
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    last = {k: line.split("] ", 1)[-1].strip() for line in lines for k in keys if k in line}
    return [last[k] for k in keys if k in last]


def disk_size(folder: Path) -> tuple[int, int]:
    """(bytes of *.safetensors, bytes of every file) in folder."""
    files = [f for f in Path(folder).iterdir() if f.is_file()]
    return sum(f.stat().st_size for f in files if f.suffix == ".safetensors"), sum(f.stat().st_size for f in files)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=96, help="requests of (b) and (c), per round")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (c)")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-minute load average is below")
    ap.add_argument("--max-wait", type=float, default=1200, help="seconds to wait for it at most")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads of this process (the front's signature model); retrieval is "
                         "also timed at torch's default for comparison")
    ap.add_argument("--workdir", help="store and exports go here (default: a temporary folder)")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON)
    add_record_args(ap)
    args = ap.parse_args()
    wait_for_quiet(args.max_load, args.max_wait)
    with record("route_load", args.results, args.record):
        run(args)


def run(args: argparse.Namespace) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    ctx = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(ctx.name if ctx else args.workdir)
    deployment = front = serve = None
    summary = []
    try:
        store = root / "store"
        if not (store / "manifest.json").exists():
            build_store(store)
        deployment, urls = start_deployment(store, root / "exports", args.vllm_python)
        front = Front(store, urls)
        print(f"front at {front.url}; load average now {load1():.2f}\n", flush=True)

        # (a) added latency
        rets = {}
        for threads in sorted({torch.get_num_threads(), args.torch_threads}, reverse=True):
            torch.set_num_threads(threads)  # the signature model's intra-op threads (process-wide)
            rets[threads] = retrieval_latency(front, args.latency_requests)
            r = rets[threads]
            print(f"(a) retrieval, Router.choose on {len(r)} held-out prompts (3 domains), torch threads {threads}: "
                  f"p50 {pct(r, 0.5) * 1e3:.1f} ms, p99 {pct(r, 0.99) * 1e3:.1f} ms", flush=True)
        torch.set_num_threads(args.torch_threads)
        ret = rets[args.torch_threads]
        r50, r99 = pct(ret, 0.5) * 1e3, pct(ret, 0.99) * 1e3
        print(f"    at torch threads {args.torch_threads} (used from here on): p50 {r50:.1f} ms "
              f"{mark(r50 <= RETRIEVAL_TARGET_MS)} (target p50 <= {RETRIEVAL_TARGET_MS:.0f} ms)")
        lat = proxy_latency(front, urls["python"], args.latency_requests)
        p = {k: (pct(v, 0.5) * 1e3, pct(v, 0.99) * 1e3) for k, v in lat.items()}
        o50, o99 = p["pinned"][0] - p["direct"][0], p["pinned"][1] - p["direct"][1]
        paired = statistics.median(a - b for a, b in zip(lat["pinned"], lat["direct"], strict=True)) * 1e3
        print(f"(a) proxying, 1-token request, {args.latency_requests} each, rotating order: direct to the python "
              f"upstream p50 {p['direct'][0]:.1f} ms p99 {p['direct'][1]:.1f} ms; front pinned {MODEL_NAME}:python "
              f"p50 {p['pinned'][0]:.1f} ms p99 {p['pinned'][1]:.1f} ms; front retrieved ({MODEL_NAME}) p50 "
              f"{p['retrieved'][0]:.1f} ms p99 {p['retrieved'][1]:.1f} ms")
        print(f"    proxying overhead (pinned - direct): p50 {o50:.1f} ms, p99 {o99:.1f} ms, median of paired "
              f"differences {paired:.1f} ms {mark(o50 <= PROXY_TARGET_MS)} (target p50 <= {PROXY_TARGET_MS:.0f} ms); "
              f"retrieval through HTTP (retrieved - pinned): p50 {p['retrieved'][0] - p['pinned'][0]:.1f} ms",
              flush=True)
        summary += [(f"retrieval p50 / p99 (torch threads {args.torch_threads})", f"{r50:.1f} / {r99:.1f} ms",
                     f"<= {RETRIEVAL_TARGET_MS:.0f} ms p50", mark(r50 <= RETRIEVAL_TARGET_MS)),
                    ("proxy overhead p50 / p99", f"{o50:.1f} / {o99:.1f} ms", f"<= {PROXY_TARGET_MS:.0f} ms p50",
                     mark(o50 <= PROXY_TARGET_MS))]
        summary += [(f"retrieval p50 (torch threads {t})", f"{pct(r, 0.5) * 1e3:.1f} ms", "", "")
                    for t, r in rets.items() if t != args.torch_threads]

        # (b) concurrent clients through the front
        queries = query_texts(n_per_domain=max(1, args.requests // 3 + 1))
        jobs = [{"model": MODEL_NAME, "prompt": q, "max_tokens": args.max_tokens, "temperature": 0}
                for _, q in queries[:args.requests]]
        count0, total0, buckets0 = histogram(front.metrics(), "moeprune_retrieval_seconds")
        b = run_clients(front.url, jobs, args.clients)
        print(f"\n(b) {args.clients} clients, {len(jobs)} requests of {args.max_tokens} tokens, 3 domains, through "
              f"the front\n    {describe('front', b)}\n    routed: {b['routes']} (* = fell back)")
        count, total, buckets = histogram(front.metrics(), "moeprune_retrieval_seconds")
        count, total = count - count0, total - total0  # this load's retrievals only
        buckets = [(le, c - c0) for (le, c), (_, c0) in zip(buckets, buckets0, strict=True)]
        h50 = bucket_quantile(buckets, count, 0.5) * 1e3
        h99 = bucket_quantile(buckets, count, 0.99) * 1e3
        print(f"    the front's moeprune_retrieval_seconds over these: {count:.0f} retrievals, mean "
              f"{total / max(count, 1) * 1e3:.1f} ms, p50 <= {h50:g} ms, p99 <= {h99:g} ms (histogram bucket "
              f"bounds; with {args.clients} clients retrieval queues for the thread pool and CPU)", flush=True)
        summary += [(f"(b) failures, {args.clients} clients x {len(jobs)} req", str(b["failures"]), "0",
                     mark(b["failures"] == 0))]

        # (c) tokens/s: the front over vLLM vs moeprune serve, same requests, interleaved rounds
        print(f"\n(c) the same {len(jobs)} requests from {args.clients} clients: front over vLLM vs "
              f"`moeprune serve {MODEL_NAME} --store STORE` (defaults: every expert, max batch 8)", flush=True)
        serve = MoepruneServer(store, "1.0")
        run_clients(serve.url, jobs[:args.clients], args.clients)  # warm-up: the first loads
        ratios, fr, sr, failed = [], [], [], b["failures"]
        for i in range(args.rounds):
            f = b if i == 0 else run_clients(front.url, jobs, args.clients)
            s = run_clients(serve.url, jobs, args.clients)
            ratios.append(f["tps"] / s["tps"])
            fr.append(f["tps"])
            sr.append(s["tps"])
            failed += (f["failures"] if i else 0) + s["failures"]
            print(f"    round {i + 1}: front/vLLM {f['tps']:.1f} tokens/s ({f['tokens']} tokens, {f['wall']:.1f} s, "
                  f"failures {f['failures']}); moeprune serve {s['tps']:.1f} tokens/s ({s['tokens']} tokens, "
                  f"{s['wall']:.1f} s, failures {s['failures']}, p50 {pct(s['lat'], 0.5):.2f} s): {ratios[-1]:.2f}x",
                  flush=True)
        ratio = statistics.median(ratios)
        print(f"    front over vLLM / moeprune serve: median {ratio:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x "
              f"over {len(ratios)} rounds)")
        summary += [("(c) tokens/s front+vLLM / moeprune serve",
                     f"{statistics.median(fr):.0f} / {statistics.median(sr):.0f} = {ratio:.2f}x", "", "")]
        serve_rss = serve.peak_rss_mib()
        serve_now = tree_rss_kib(serve.proc.pid)[0] / 1024

        # (d) memory
        print("\n(d) memory of each vLLM server (VmRSS of its process tree, now, after the load) vs its export on disk")
        rows = []
        for srv in deployment.servers:
            kib, each = tree_rss_kib(srv.process.pid)
            st, total_bytes = disk_size(Path(srv.model))
            rows.append((srv.name, f"{kib / 1024:.0f} MiB", ", ".join(f"{n} {k / 1024:.0f}" for n, k in each),
                         f"{st / 2**20:.1f} MiB", f"{kib * 1024 / st:.0f}x"))
            for line in log_lines(srv.log):
                print(f"    {srv.name} log: {line}")
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        head = ("server", "RSS (tree)", "per process (MiB)", "safetensors on disk", "RSS / disk")
        widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
        print("    " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for r in rows:
            print("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        print(f"    moeprune serve (all experts, whole demo model {disk_size(DEMO_MODEL)[0] / 2**20:.1f} MiB on disk): "
              f"VmRSS {serve_now:.0f} MiB now, peak {serve_rss:.0f} MiB")
        print("    (vLLM's KV cache is VLLM_CPU_KVCACHE_SPACE = "
              f"{os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB per server, part of the worker's RSS once touched)")
        for r in rows:
            summary.append((f"(d) RSS {r[0]} vs disk", f"{r[1]} vs {r[3]}", "", ""))
    finally:
        if serve is not None:
            serve.stop()
        if front is not None:
            front.stop()
        if deployment is not None:
            deployment.stop()
        if ctx:
            ctx.cleanup()
    print(f"\nsummary (load average at the end {load1():.2f})")
    w = [max(len(r[i]) for r in summary) for i in range(4)]
    for r in summary:
        print("  " + "  ".join(c.ljust(x) for c, x in zip(r, w, strict=True)))
    print(json.dumps({"summary": summary}, ensure_ascii=False))


if __name__ == "__main__":
    main()
