"""Does `moeprune route` in front of vLLM (CPU build) give the same greedy tokens as vLLM directly, and
as `moeprune.load_slim` of the routed pattern?

1. Builds a store of the demo model's three domains (python, legal, bible; keep 0.5), as the tests do.
2. `moeprune.serve.deploy.Deployment` exports the python and legal patterns and starts one vLLM
   OpenAI server per export plus a fallback serving the whole demo model, all from the vLLM virtual
   environment (`--vllm-python`, default /work/vllm-venv/bin/python; see benchmarks/vllm_check.py for
   how it is made), with `--dtype float32 --enforce-eager --max-model-len 512` and
   VLLM_CPU_KVCACHE_SPACE=1 (GiB). The engines' logs are in <workdir>/exports/logs/.
3. Runs the routing front in this process (uvicorn in a thread, on a free loopback port) with the
   signature model and the store, upstreams python and legal and the fallback.
4. For two held-out prompts of each domain (moeprune/demo_data/*.eval.jsonl, first 300 characters),
   sends a greedy completion (temperature 0, 16 tokens, EOS suppressed with `min_tokens` and
   `ignore_eos`, `return_token_ids`) through the front, then the same request straight to the
   upstream the front chose, each streamed and not streamed (streamed deltas concatenated), and
   generates with `load_slim(demo_model, pattern, dtype=float32)` (the full model for the fallback)
   and `generate(do_sample=False, min_new_tokens=16)` from the same prompt ids.
   The python and legal prompts must be routed to their own pattern, the bible ones (no upstream
   serves bible) to the fallback.

Prints a row per prompt; exit status 0 when every route is the expected one and every comparison equal.
The log goes to benchmarks/results/route_check-<date>.txt (`--no-record` for a smoke run).

    python benchmarks/route_check.py [--workdir DIR] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
from serve_load import free_port

from moeprune.demo import DEMO_DATA, DEMO_MODEL

from _record import add_record_args, record

DOMAINS = ("python", "legal", "bible")
SERVED = ("python", "legal")
MODEL_NAME = "demo_model"
VLLM_PYTHON = "/work/vllm-venv/bin/python"
ENGINE = ("{vllm_python} -m vllm.entrypoints.openai.api_server --model {model} --host 127.0.0.1 --port {port} "
          "--served-model-name {name}")
ENGINE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "32",
               "--disable-log-stats"]
NEW_TOKENS = 16


def free_ports(n: int) -> int:
    """A base port with n free ports after it (checked, not reserved)."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no run of free loopback ports")


def build_store(path: Path) -> None:
    """The three demo domains, every calibration prompt, keep 0.5 (as tests/conftest.py's demo_store_path)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.prompts import read_prompts
    from moeprune.store import PatternStore

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    store = PatternStore(path)
    for d in DOMAINS:
        prof = moeprune.profile(model, read_prompts(DEMO_DATA / f"{d}.calib.jsonl"), tokenizer=tok, domain=d,
                                max_length=256)
        store.add(d, prof, prof.select(keep=0.5), rebuild=False)
    store.rebuild_index()


def eval_texts(n_chars: int = 300) -> dict[str, list[str]]:
    """Held-out texts of each domain, first `n_chars` characters of each."""
    out = {}
    for d in DOMAINS:
        with open(DEMO_DATA / f"{d}.eval.jsonl") as f:
            out[d] = [json.loads(line)["text"][:n_chars] for line in f if line.strip()]
    return out


def engine_template(vllm_python: str) -> str:
    return ENGINE.replace("{vllm_python}", vllm_python)


def start_deployment(store: Path, exports: Path, vllm_python: str, patterns=SERVED):
    """Deployment of `patterns` + the fallback on vLLM; returns (deployment, {name: url})."""
    from moeprune.serve.deploy import Deployment

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, inherited by the engines
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    d = Deployment(str(store), str(DEMO_MODEL), str(exports), engine=engine_template(vllm_python),
                   engine_args=list(ENGINE_ARGS), patterns=list(patterns), base_port=free_ports(len(patterns) + 1),
                   startup_timeout=600)
    t0 = time.perf_counter()
    urls = d.start()
    print(f"deployment up in {time.perf_counter() - t0:.0f} s: " + ", ".join(f"{k} {v}" for k, v in urls.items()),
          flush=True)
    return d, urls


class Front:
    """The routing front in this process: uvicorn in a thread on a free loopback port."""

    def __init__(self, store: Path, urls: dict[str, str], engines: list[str] | None = None):
        import torch
        import uvicorn

        from moeprune.models import load_tokenizer
        from moeprune.serve.route import RouteConfig, Router, create_route_app
        from moeprune.store import PatternStore
        from moeprune.store.signature import load_signature_model

        upstreams = {k: v for k, v in urls.items() if k != "fallback"}
        self.config = RouteConfig(model_name=MODEL_NAME, upstreams=upstreams, fallback=urls.get("fallback"),
                                  engines=engines, source=str(DEMO_MODEL) if engines else None)
        self.store = PatternStore(str(store), on_corrupt="skip")
        signature = load_signature_model(DEMO_MODEL, dtype=torch.float32)
        self.router = Router(self.store, signature, load_tokenizer(str(DEMO_MODEL)), self.config)
        self.app = create_route_app(self.router, self.config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the front did not start")
            time.sleep(0.05)
        health = httpx.get(f"{self.url}/health", timeout=10).json()
        if health["status"] != "ok":
            raise RuntimeError(f"the front's upstreams are not all healthy: {health}")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def body(prompt: str, model: str, stream: bool, max_tokens: int = NEW_TOKENS) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "min_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True}


def complete(client: httpx.Client, base: str, req: dict) -> dict:
    """POST a completion; {'ids', 'text', 'prompt_ids', 'headers'} (a stream's deltas concatenated)."""
    if not req.get("stream"):
        r = client.post(f"{base}/completions", json=req)
        if r.status_code != 200:
            raise RuntimeError(f"{base}: {r.status_code} {r.text[:300]}")
        c = r.json()["choices"][0]
        return {"ids": c["token_ids"], "text": c["text"], "prompt_ids": c.get("prompt_token_ids"),
                "headers": r.headers}
    ids, text, prompt_ids = [], [], None
    with client.stream("POST", f"{base}/completions", json=req) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: {r.status_code} {r.read()[:300]!r}")
        headers = r.headers
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                ids += c.get("token_ids") or []
                text.append(c.get("text") or "")
                prompt_ids = prompt_ids or c.get("prompt_token_ids")
    return {"ids": ids, "text": "".join(text), "prompt_ids": prompt_ids, "headers": headers}


def reference_tokens(prompt_ids: list[int], pattern, cache: dict, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens of load_slim(demo model, pattern) in float32 (the full model when pattern is None)."""
    import torch
    from transformers import AutoModelForCausalLM

    import moeprune

    key = pattern.digest if pattern is not None else "full"
    if key not in cache:
        if pattern is None:
            cache[key] = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
        else:
            cache[key] = moeprune.load_slim(DEMO_MODEL, pattern, dtype=torch.float32).eval()
    model = cache[key]
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=model.config.pad_token_id)
    return y[0, len(prompt_ids):].tolist()


def check(front: Front, urls: dict[str, str]) -> bool:
    from moeprune.models import load_tokenizer

    tok = load_tokenizer(str(DEMO_MODEL))
    texts = eval_texts()
    cache: dict = {}
    rows, all_ok = [], True
    with httpx.Client(timeout=300) as client:
        for domain in DOMAINS:
            for i, prompt in enumerate(texts[domain][:2]):
                expected = domain if domain in SERVED else "fallback"
                via = {s: complete(client, f"{front.url}/v1", body(prompt, MODEL_NAME, s)) for s in (False, True)}
                upstream = via[False]["headers"].get("x-moeprune-upstream")
                s_upstream = via[True]["headers"].get("x-moeprune-upstream")
                fell_back = via[False]["headers"].get("x-moeprune-fallback")
                direct = {s: complete(client, urls[upstream], body(prompt, upstream, s)) for s in (False, True)}
                pattern = None if upstream == "fallback" else front.store.find(upstream)
                hf_ids = tok(prompt)["input_ids"]
                ref = reference_tokens(direct[False]["prompt_ids"], pattern, cache)
                r = {
                    "prompt": f"{domain}[{i}]",
                    "routed": f"{upstream}{' (fell back)' if fell_back == 'true' else ''}",
                    "route ok": upstream == expected and s_upstream == expected,
                    "front==direct": via[False]["ids"] == direct[False]["ids"]
                    and via[False]["text"] == direct[False]["text"],
                    "direct==slim": direct[False]["ids"] == ref,
                    "streamed equal": via[True]["ids"] == direct[True]["ids"] == direct[False]["ids"]
                    and via[True]["text"] == direct[True]["text"] == direct[False]["text"],
                    "prompt ids": direct[False]["prompt_ids"] == hf_ids == via[False]["prompt_ids"],
                    "n": len(via[False]["ids"]),
                }
                ok = all(v for k, v in r.items() if isinstance(v, bool))
                all_ok &= ok and r["n"] == NEW_TOKENS
                rows.append(r)
                if not ok:
                    print(f"  {r['prompt']}: front {via[False]['ids']} / streamed {via[True]['ids']}\n"
                          f"  {' ' * len(r['prompt'])}  direct {direct[False]['ids']} / streamed {direct[True]['ids']}"
                          f"\n  {' ' * len(r['prompt'])}  reference {ref}; prompt ids vLLM {direct[False]['prompt_ids']}"
                          f" vs transformers {hf_ids}")
                print(f"  {r['prompt']}: routed to {r['routed']}, {json.dumps(via[False]['text'])[:70]}", flush=True)
    cols = ["prompt", "routed", "route ok", "front==direct", "direct==slim", "streamed equal", "prompt ids", "n"]
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("(route ok: python/legal to their own pattern, bible to the fallback; direct==slim compares with "
          "load_slim of the pattern, or the full model for the fallback; prompt ids: vLLM's tokenisation of the "
          "prompt equals transformers'; n: tokens generated)")
    return all_ok


def fmt(v) -> str:
    return ("yes" if v else "NO") if isinstance(v, bool) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="store and exports go here (default: a temporary folder)")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON, help="the vLLM virtual environment's python")
    add_record_args(ap)
    args = ap.parse_args()
    if not Path(args.vllm_python).is_file():
        print(f"no vLLM python at {args.vllm_python}; see benchmarks/vllm_check.py for how the venv is made",
              file=sys.stderr)
        return 2
    with record("route_check", args.results, args.record):
        sys.exit(run(args))


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformers.utils.logging.disable_progress_bar()
    ctx = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(ctx.name if ctx else args.workdir)
    deployment = front = None
    try:
        store = root / "store"
        t0 = time.perf_counter()
        if not (store / "manifest.json").exists():
            build_store(store)
            print(f"store built in {time.perf_counter() - t0:.0f} s: {store}")
        else:
            print(f"using the store at {store}")
        deployment, urls = start_deployment(store, root / "exports", args.vllm_python)
        for s in deployment.servers:
            print(f"  {s.name}: {' '.join(s.command)}")
        front = Front(store, urls)
        print(f"front at {front.url}\n", flush=True)
        ok = check(front, urls)
    finally:
        if front is not None:
            front.stop()
        if deployment is not None:
            deployment.stop()
        if ctx:
            ctx.cleanup()
    print("\nALL EQUAL" if ok else "\nSOME CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
