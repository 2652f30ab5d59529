"""Compare demo-model training recipes by how well their experts prune (exploration, not CI).

Each variant trains with `train_demo_moe.py` (same step budget), then per domain: profile the
first 16 calibration prompts (128 tokens), keep 50% and 25% of the experts per layer by a few
criteria, and measure perplexity under the keep-mask (identical to the slim model) on two texts:

- `validation`: the domain's other 48 calibration documents (`calib.jsonl[16:]`), which no
  variant trains on, profiles on, or is evaluated on elsewhere. **The recipe is chosen here.**
- `eval`: the domain's `eval.jsonl`, where the README's headline numbers are measured; reported
  for reference only, never used to choose.

Prints pruned/full perplexity, geometric mean over domains, per split, and the recipe the
validation split picks (lowest best-criterion ratio at 25% kept, ties broken at 50%).

    python benchmarks/recipe_sweep.py --device cuda --corpora ../shared/corpora --out /tmp/sweep
    python benchmarks/recipe_sweep.py --corpora ../shared/corpora --out build/sweep --jobs 2 --threads 1   # CPU
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _record import add_record_args, record

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "base": ["--top-k", "4"],
    "top2": [],
    "aux03": ["--top-k", "4", "--aux", "0.03"],
    "top2_aux03": ["--top-k", "2", "--aux", "0.03"],
}
DOMAINS = ["python", "c_headers", "legal", "bible", "german", "dictionary", "manpages"]


CALIB_PROMPTS = 16  # profiled; the rest of calib.jsonl is the validation text
SPLITS = ("validation", "eval")


def split_texts(corpora: Path, domain: str, split: str) -> list[str]:
    from moeprune.prompts import read_documents

    if split == "validation":
        return read_documents(corpora / domain / "calib.jsonl")[CALIB_PROMPTS:]
    return read_documents(corpora / domain / "eval.jsonl")


def geomean(results: dict) -> dict:
    keys = [k for k in results[DOMAINS[0]] if k != "full"]
    return {k: math.exp(sum(math.log(results[d][k]) for d in DOMAINS) / len(DOMAINS)) for k in keys}


def choose(summaries: dict[str, dict]) -> str:
    """The recipe whose best informed criterion prunes best on validation: 25% kept first, then 50%."""
    def best(g: dict, keep: int) -> float:
        return min(v for k, v in g.items() if k.endswith(f"@{keep}") and not k.startswith("random"))

    def key(v: str) -> tuple:
        g = summaries[v]
        keeps = sorted({int(k.split("@")[1]) for k in g})
        return tuple(best(g, keep) for keep in keeps)  # smallest keep (hardest) first

    return min(summaries, key=key)


def evaluate_variant(model_dir: Path, corpora: Path, device: str, eval_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.hooks import keep_mask
    from moeprune.prompts import read_prompts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    adapter = moeprune.get_adapter(model)
    n = adapter.num_experts(model.config)
    results: dict = {split: {} for split in SPLITS}
    for d in DOMAINS:
        calib = read_prompts(corpora / d / "calib.jsonl")[:CALIB_PROMPTS]
        prof = moeprune.profile(model, calib, tokenizer=tok, max_length=128, batch_size=16)
        patterns = {f"{crit}@{keep}": prof.select(keep=keep, criterion=crit)
                    for keep in (n // 2, n // 4) for crit in ("frequency", "easy_ep", "gate_norm", "random")}
        for split in SPLITS:
            texts = split_texts(corpora, d, split)
            full = moeprune.evaluate(model, texts, tokenizer=tok, max_tokens=eval_tokens, batch_size=32).perplexity
            row = {"full": full}
            for name, pattern in patterns.items():
                with keep_mask(model, adapter, {k: v.to(device) for k, v in pattern.keep_masks().items()}):
                    ppl = moeprune.evaluate(model, texts, tokenizer=tok, max_tokens=eval_tokens,
                                            batch_size=32).perplexity
                row[name] = ppl / full
            results[split][d] = row
    for split in SPLITS:
        results[split]["geomean"] = geomean(results[split])
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpora", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--eval-tokens", type=int, default=20000)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads per training process")
    ap.add_argument("--jobs", type=int, default=len(VARIANTS), help="variants trained at once")
    ap.add_argument("--summarize", action="store_true", help="only print the summary of finished variants")
    add_record_args(ap)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: train + evaluate one variant
    args = ap.parse_args()
    out = Path(args.out)
    if args.one:
        work = out / args.one
        cmd = [sys.executable, str(HERE / "train_demo_moe.py"), "--out", str(work), "--corpora", args.corpora,
               "--device", args.device, "--steps", str(args.steps), "--install", str(work / "model"), "--force",
               "--threads", str(args.threads), *VARIANTS[args.one]]
        work.mkdir(parents=True, exist_ok=True)
        with open(work.parent / f"{args.one}.train.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        res = evaluate_variant(work / "model", Path(args.corpora), args.device, args.eval_tokens)
        (out / f"{args.one}.json").write_text(json.dumps(res, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    with record("recipe_sweep", args.results, args.record):
        sweep(args, out)


def sweep(args: argparse.Namespace, out: Path) -> None:
    """Train and evaluate the variants (`--jobs` at a time), then print the summary and the choice."""
    pending, running = ([] if args.summarize else list(args.variants)), {}
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            v = pending.pop(0)
            running[v] = subprocess.Popen([sys.executable, __file__, "--out", str(out), "--corpora", args.corpora,
                                           "--device", args.device, "--steps", str(args.steps), "--eval-tokens",
                                           str(args.eval_tokens), "--threads", str(args.threads), "--one", v])
        for v, p in list(running.items()):
            if p.poll() is not None:
                print(f"{v}: exit {p.returncode}", flush=True)
                del running[v]
        time.sleep(1)
    summaries: dict[str, dict] = {split: {} for split in SPLITS}
    for v in args.variants:
        f = out / f"{v}.json"
        if f.exists():
            res = json.loads(f.read_text())
            for split in SPLITS:
                summaries[split][v] = res[split]["geomean"]
    for split in SPLITS:
        print(f"\n{split}: pruned/full perplexity, geometric mean over {len(DOMAINS)} domains")
        for v, g in summaries[split].items():
            print(f"  {v:<11}", " ".join(f"{k}={x:.3f}" for k, x in g.items()))
    if summaries["validation"]:
        print(f"\nchosen on validation: {choose(summaries['validation'])}")


if __name__ == "__main__":
    main()
