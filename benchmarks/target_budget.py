"""How much can be pruned, checked: predicted vs measured perplexity loss at the chosen budget.

Per domain of the corpora: profile the calibration demonstrations on the demo model, choose the
smallest uniform budget for max_loss 2% and 5% (`moeprune.BudgetSearch`: k-fold over those
demonstrations, easy_ep), and measure the loss that budget's pattern actually has on the domain's
held-out eval text (never seen by the profile or the folds). Prints a table, writes the run's log
and `target_budget.json` into the results folder (or `--no-record` for a smoke run).

    python benchmarks/target_budget.py [--corpora ../shared/corpora] [--prompts 64] [--folds 4]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from _record import add_record_args, record, results_dir

DOMAINS = ("python", "c_headers", "legal", "bible", "german", "dictionary", "manpages")


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune import BudgetSearch, evaluate, profile
    from moeprune.demo import DEMO_MODEL
    from moeprune.hooks import keep_mask
    from moeprune.prompts import read_documents, read_prompts
    from moeprune.routers import get_adapter

    torch.manual_seed(0)
    model_dir = args.model or DEMO_MODEL
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    adapter = get_adapter(model)
    rows = []
    for d in args.domains:
        t0 = time.time()
        prompts = read_prompts(args.corpora / d / "calib.jsonl")[: args.prompts]
        texts = read_documents(args.corpora / d / "eval.jsonl")
        prof = profile(model, prompts, tokenizer=tok, domain=d, max_length=args.max_length)
        search = BudgetSearch(prof, model, prompts, tokenizer=tok, folds=args.folds, criterion=args.criterion,
                              max_tokens=args.fold_tokens)
        kw = dict(tokenizer=tok, window=256, max_tokens=args.eval_tokens, batch_size=16)
        full = evaluate(model, texts, **kw)
        for target in args.targets:
            pattern, report = search.select(max_loss=target)
            with keep_mask(model, adapter, pattern.keep_masks()):
                pruned = evaluate(model, texts, **kw)
            measured = math.exp(pruned.nll - full.nll) - 1
            lo, hi = report.loss_spread
            rows.append({"domain": d, "max_loss": target, "budget": report.budget, "of": report.num_experts,
                         "predicted": report.predicted_loss, "fold_min": lo, "fold_max": hi, "measured": measured,
                         "within_spread": lo <= measured <= hi, "within_target": measured <= target,
                         "mass_kept": report.mass_kept,
                         "candidates": [{"budget": c.budget, "loss": c.loss, "fold_losses": c.fold_losses}
                                        for c in report.candidates]})
            print(f"{d:<11} max_loss {target:>4.0%}: keep {report.budget:>2}/{report.num_experts}  predicted "
                  f"{report.predicted_loss:+.2%} (folds {lo:+.2%}..{hi:+.2%})  measured {measured:+.2%} "
                  f"on {full.tokens} eval tokens", flush=True)
        print(f"  ({time.time() - t0:.0f} s; candidates "
              + ", ".join(f"{c.budget}: {c.loss:+.1%}" for c in report.candidates if c.fold_losses) + ")",
              flush=True)
    return {"model": str(model_dir), "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                                               vars(args).items()}, "rows": rows}


def table(result: dict) -> str:
    lines = ["| domain | max loss | kept | predicted (fold min..max) | measured on eval text | within target |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['domain']} | {r['max_loss']:.0%} | {r['budget']}/{r['of']} | {r['predicted']:+.2%} "
                     f"({r['fold_min']:+.2%}..{r['fold_max']:+.2%}) | {r['measured']:+.2%} | "
                     f"{'yes' if r['within_target'] else 'no'} |")
    rows = result["rows"]
    inside = sum(r["within_spread"] for r in rows)
    err = [r["measured"] - r["predicted"] for r in rows]
    lines += ["", f"measured within the fold spread: {inside}/{len(rows)}; measured within the target: "
              f"{sum(r['within_target'] for r in rows)}/{len(rows)}; measured - predicted: mean {sum(err) / len(err):+.2%}, "
              f"range {min(err):+.2%}..{max(err):+.2%}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpora")
    ap.add_argument("--model", help="checkpoint folder (default: the bundled demo model)")
    ap.add_argument("--domains", nargs="*", default=list(DOMAINS))
    ap.add_argument("--prompts", type=int, default=64, help="calibration demonstrations per domain")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per demonstration")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--fold-tokens", type=int, default=None, help="held-out tokens scored per fold (default all)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="eval-text tokens scored per domain")
    ap.add_argument("--criterion", default="easy_ep")
    ap.add_argument("--targets", type=float, nargs="*", default=[0.02, 0.05])
    ap.add_argument("-o", "--output", type=Path, help="JSON of the results (default: results folder)")
    add_record_args(ap)
    args = ap.parse_args()
    with record("target_budget", args.results, args.record):
        result = run(args)
        print()
        print(table(result))
        out = args.output or (results_dir(args.results) / "target_budget.json")
        if args.record or args.output:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
