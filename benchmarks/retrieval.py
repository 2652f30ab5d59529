"""Retrieval on the demo model: which signature kind finds the right pattern, and which says "no match".

Stores the seven domains' patterns (from their 64 calibration prompts), queries 50 held-out
prompts per domain (the first 512 characters of eval documents), prints top-1 accuracy and the
confusion matrix per signature kind; then, for each domain, builds a store of the other six and
reports how often its queries fall back.

    python benchmarks/retrieval.py [--corpora ../shared/corpora]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune.bench import DOMAINS
from moeprune.demo import DEMO_MODEL
from moeprune.store.evaluation import confusion_table, retrieval_benchmark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpora"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    profiles = None
    for kind in ("router", "hidden"):
        r = retrieval_benchmark(model, tok, args.corpora, list(DOMAINS), kind=kind, profiles=profiles)
        profiles = r["profiles"]
        print(f"\n## signature: {kind}\n")
        print(f"top-1 accuracy {r['accuracy']:.1%} over {r['n_queries'] * len(DOMAINS)} queries; per domain: "
              + ", ".join(f"{d} {v:.0%}" for d, v in r["per_domain"].items()))
        print(confusion_table(r, list(DOMAINS)))
        print("unseen domain (store of the other six): fallback rate "
              + ", ".join(f"{d} {v:.0%}" for d, v in r["held_out_fallback"].items())
              + f"; mean {r['mean_held_out_fallback']:.0%}")


if __name__ == "__main__":
    main()
