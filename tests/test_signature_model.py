"""`load_signature_model`: only the layers up to the first MoE router, read from the checkpoint,
embed queries exactly as the whole model does (what a routing front needs)."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, char_tokenizer, save_tiny

from moeprune.fingerprint import model_fingerprint
from moeprune.models import load_model
from moeprune.store.signature import embed, load_signature_model

QUERIES = ["hello world", "def f(x): return 2", "a much longer query with several words in it"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_signature_model_embeds_like_the_whole_model(tmp_path, family):
    save_tiny(family, tmp_path)
    full, sig, tok = load_model(tmp_path)[0], load_signature_model(tmp_path), char_tokenizer()
    for kind in ("hidden", "router"):
        assert torch.equal(embed(full, tok, QUERIES, kind), embed(sig, tok, QUERIES, kind)), kind
    assert sig.moeprune_source_fingerprint == model_fingerprint(full)
    layers = sig.model.layers
    first = min(i for i, layer in enumerate(layers) if any(p.is_meta for p in layer.parameters()))
    assert all(p.is_meta for layer in layers[first + 1:] for p in layer.parameters())  # never read
    assert sig.lm_head.weight.is_meta  # no output head: the forward stops at the first router
