"""Qwen3-MoE: softmax top-k, renormalised with `norm_topk_prob`; no shared expert.
Dense layers: `mlp_only_layers`, `decoder_sparse_step`."""

from __future__ import annotations

from .base import MoEAdapter, moe_layers_by_step, softmax_topk


class Qwen3MoeAdapter(MoEAdapter):
    family = "Qwen3-MoE"
    model_types = ("qwen3_moe",)
    num_experts_field = "num_experts"

    def moe_layers(self, config):
        return moe_layers_by_step(config, self.num_experts(config))

    def route(self, router, logits, keep=None):
        return softmax_topk(logits, router.top_k, keep, normalise=router.norm_topk_prob, cast_back=True)


ADAPTERS = [Qwen3MoeAdapter()]
