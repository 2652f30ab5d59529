"""Compare demo-model training recipes by how well their experts prune (exploration, not CI).

Each variant trains with `train_demo_moe.py` (same step budget), then per domain: profile 16
calibration prompts (128 tokens), keep 50% and 25% of the experts per layer by a few criteria,
and measure perplexity on the domain's eval text under the keep-mask (identical to the slim
model). Prints pruned/full perplexity, geometric mean over domains. Variants run in parallel.

    python benchmarks/recipe_sweep.py --device cuda --corpora ../shared/corpora --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "base": ["--top-k", "4"],
    "top2": [],
    "aux03": ["--top-k", "4", "--aux", "0.03"],
    "top2_aux03": ["--top-k", "2", "--aux", "0.03"],
}
DOMAINS = ["python", "c_headers", "legal", "bible", "german", "dictionary", "manpages"]


def evaluate_variant(model_dir: Path, corpora: Path, device: str, eval_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.hooks import keep_mask
    from moeprune.prompts import read_documents, read_prompts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    adapter = moeprune.get_adapter(model)
    n = adapter.num_experts(model.config)
    results: dict = {}
    for d in DOMAINS:
        calib = read_prompts(corpora / d / "calib.jsonl")[:16]
        texts = read_documents(corpora / d / "eval.jsonl")
        prof = moeprune.profile(model, calib, tokenizer=tok, max_length=128, batch_size=16)
        full = moeprune.evaluate(model, texts, tokenizer=tok, max_tokens=eval_tokens, batch_size=32).perplexity
        row = {"full": full}
        for keep in (n // 2, n // 4):
            for crit in ("frequency", "easy_ep", "gate_norm", "random"):
                pattern = prof.select(keep=keep, criterion=crit)
                with keep_mask(model, adapter, {k: v.to(device) for k, v in pattern.keep_masks().items()}):
                    ppl = moeprune.evaluate(model, texts, tokenizer=tok, max_tokens=eval_tokens,
                                            batch_size=32).perplexity
                row[f"{crit}@{keep}"] = ppl / full
        results[d] = row
    keys = [k for k in results[DOMAINS[0]] if k != "full"]
    results["geomean"] = {k: math.exp(sum(math.log(results[d][k]) for d in DOMAINS) / len(DOMAINS)) for k in keys}
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpora", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--eval-tokens", type=int, default=20000)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: train + evaluate one variant
    args = ap.parse_args()
    out = Path(args.out)
    if args.one:
        work = out / args.one
        cmd = [sys.executable, str(HERE / "train_demo_moe.py"), "--out", str(work), "--corpora", args.corpora,
               "--device", args.device, "--steps", str(args.steps), "--install", str(work / "model"), "--force",
               "--threads", "2", *VARIANTS[args.one]]
        work.mkdir(parents=True, exist_ok=True)
        with open(work.parent / f"{args.one}.train.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        res = evaluate_variant(work / "model", Path(args.corpora), args.device, args.eval_tokens)
        (out / f"{args.one}.json").write_text(json.dumps(res, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    procs = {v: subprocess.Popen([sys.executable, __file__, "--out", str(out), "--corpora", args.corpora,
                                  "--device", args.device, "--steps", str(args.steps), "--eval-tokens",
                                  str(args.eval_tokens), "--one", v]) for v in args.variants}
    for v, p in procs.items():
        p.wait()
        print(f"{v}: exit {p.returncode}", flush=True)
    for v in args.variants:
        f = out / f"{v}.json"
        if f.exists():
            g = json.loads(f.read_text())["geomean"]
            print(v, " ".join(f"{k}={x:.3f}" for k, x in g.items()))


if __name__ == "__main__":
    main()
