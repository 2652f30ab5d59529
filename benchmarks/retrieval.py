"""Retrieval on the demo model: which signature kind finds the right pattern, and which says "no match".

Stores the seven domains' patterns (from their 64 calibration prompts), queries 50 held-out
prompts per domain (the first 512 characters of eval documents), prints top-1 accuracy and the
confusion matrix per signature kind; then, for each domain, builds a store of the other six and
reports how often its queries fall back. Ends with one summary row per signature kind (the README's
table). The log goes to benchmarks/results/ (`--no-record` for a smoke run).

    python benchmarks/retrieval.py [--corpora ../shared/corpora] [--calib 64] [--queries 50] [--domains ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune.bench import DOMAINS
from moeprune.demo import DEMO_MODEL
from moeprune.store.evaluation import confusion_table, retrieval_benchmark

from _record import add_record_args, record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpora"))
    ap.add_argument("--calib", type=int, default=64, help="calibration prompts per stored domain")
    ap.add_argument("--queries", type=int, default=50, help="held-out queries per domain")
    ap.add_argument("--domains", nargs="*", default=list(DOMAINS), help="domains (default: all seven)")
    add_record_args(ap)
    args = ap.parse_args()
    with record("retrieval", args.results, args.record):
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    domains = args.domains
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    profiles, rows = None, []
    for kind in ("router", "hidden"):  # both kinds share the profiles: the comparison is like for like
        r = retrieval_benchmark(model, tok, args.corpora, domains, kind=kind, n_calib=args.calib,
                                n_queries=args.queries, profiles=profiles)
        profiles = r["profiles"]
        print(f"\n## signature: {kind}\n")
        print(f"top-1 accuracy {r['accuracy']:.1%} over {r['n_queries'] * len(domains)} queries; per domain: "
              + ", ".join(f"{d} {v:.0%}" for d, v in r["per_domain"].items()))
        print(confusion_table(r, domains))
        print(f"unseen domain (store of the other {len(domains) - 1}): fallback rate "
              + ", ".join(f"{d} {v:.0%}" for d, v in r["held_out_fallback"].items())
              + f"; mean {r['mean_held_out_fallback']:.0%}", flush=True)
        worst = min(r["per_domain"].values())
        worst_names = ", ".join(d for d, v in r["per_domain"].items() if v == worst)
        rows.append(f"| `{kind}` | {r['accuracy']:.1%} | {worst:.0%} ({worst_names}) | "
                    f"{r['mean_held_out_fallback']:.0%} |")
    print(f"\n{args.calib} calibration prompts per domain, {args.queries} queries per domain, {len(domains)} domains:\n")
    print(f"| signature | top-1 accuracy | worst domain | unseen domain falls back (store of the other "
          f"{len(domains) - 1}, mean of {len(domains)}) |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
