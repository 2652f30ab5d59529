"""Mixtral (and MiniMax, which routes the same way): softmax over all experts, top-k, renormalise."""

from __future__ import annotations

from .base import MoEAdapter, softmax_topk


class MixtralAdapter(MoEAdapter):
    family = "Mixtral"
    model_types = ("mixtral",)
    num_experts_field = "num_local_experts"
    ckpt_block = "block_sparse_moe"
    ckpt_expert_projs = ("w1", "w3", "w2")

    def route(self, router, logits, keep=None):
        return softmax_topk(logits, router.top_k, keep, normalise=True, cast_back=False)


class MiniMaxAdapter(MixtralAdapter):
    family = "MiniMax"
    model_types = ("minimax",)


ADAPTERS = [MixtralAdapter(), MiniMaxAdapter()]
