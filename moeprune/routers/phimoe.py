"""PhiMoE: top-2 by SparseMixer; in inference the two picks are successive argmaxes, each
weighted by a softmax over the logits within a relative distance of the pick."""

from __future__ import annotations

from transformers.models.phimoe.modeling_phimoe import sparsemixer

from .base import MoEAdapter, masked


class PhimoeAdapter(MoEAdapter):
    family = "PhiMoE"
    model_types = ("phimoe",)
    num_experts_field = "num_local_experts"
    router_attr = "router"
    ckpt_block = "block_sparse_moe"
    ckpt_expert_projs = ("w1", "w3", "w2")

    def route(self, router, logits, keep=None):
        # A -inf logit gives NaN distances that compare False, so it is never masked back in
        # and its softmax weight is 0: the kept experts see exactly the sliced router's maths.
        return sparsemixer(masked(logits, keep), jitter_eps=router.router_jitter_noise, training=False, top_k=2)


ADAPTERS = [PhimoeAdapter()]
