"""Qwen3-MoE: Qwen2-MoE's router (softmax top-k, renormalised with `norm_topk_prob`) without the
shared expert. Dense layers: `mlp_only_layers`, `decoder_sparse_step`."""

from __future__ import annotations

from .qwen2_moe import Qwen2MoeAdapter


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    family = "Qwen3-MoE"
    model_types = ("qwen3_moe",)


ADAPTERS = [Qwen3MoeAdapter()]
