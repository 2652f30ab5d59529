"""GPT-OSS: top-k on (logits + bias), softmax over the k picks. Experts are fused and transposed
([E, H, 2I] with gate/up interleaved, [E, I, H]) with biases, on disk as in memory."""

from __future__ import annotations

import torch

from .base import MoEAdapter, masked


class GptOssAdapter(MoEAdapter):
    family = "GPT-OSS"
    model_types = ("gpt_oss",)
    num_experts_field = "num_local_experts"
    router_attr = "router"
    ckpt_router = "router"
    router_tensors = ("weight", "bias")
    expert_tensors = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    ckpt_expert_projs = None

    def router_probs(self, router, logits):
        # GPT-OSS never normalises over all experts; this softmax is only moeprune's view of
        # how strongly each expert is preferred (TCESS, signatures).
        return torch.softmax(logits.float(), dim=-1)

    def route(self, router, logits, keep=None):
        values, indices = torch.topk(masked(logits, keep), router.top_k, dim=-1)
        return torch.softmax(values, dim=1, dtype=values.dtype), indices


ADAPTERS = [GptOssAdapter()]
