"""OLMoE: softmax top-k (renormalised only with `norm_topk_prob`, off in OLMoE-1B-7B); every layer is MoE."""

from __future__ import annotations

from .base import MoEAdapter, softmax_topk


class OlmoeAdapter(MoEAdapter):
    family = "OLMoE"
    model_types = ("olmoe",)
    num_experts_field = "num_experts"

    def route(self, router, logits, keep=None):
        return softmax_topk(logits, router.top_k, keep, normalise=router.norm_topk_prob, cast_back=True)


ADAPTERS = [OlmoeAdapter()]
