"""Retrieval on the bundled demo model and real text: the targets of the pattern store."""

import pytest
import torch

from moeprune.bench import DOMAINS
from moeprune.demo import DEMO_MODEL
from moeprune.store.evaluation import confusion_table, retrieval_benchmark


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the bundled demo model is not present")
def test_retrieval_accuracy_and_fallback(shared_corpora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    r = retrieval_benchmark(model, tok, shared_corpora, list(DOMAINS), kind="hidden")
    print("\n" + confusion_table(r, list(DOMAINS)))
    print("held-out fallback:", {d: round(v, 2) for d, v in r["held_out_fallback"].items()})
    assert r["accuracy"] >= 0.95
    assert min(r["per_domain"].values()) >= 0.85, r["per_domain"]
    assert r["mean_held_out_fallback"] >= 0.80, r["held_out_fallback"]
