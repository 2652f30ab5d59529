"""DeepSeek-V2 and DeepSeek-V3: routed experts beside always-on shared experts, the first
`first_k_dense_replace` layers dense, and group-limited routing.

V2: softmax, greedy or group-limited (group score = max) top-k, no renormalisation,
x `routed_scaling_factor`.
V3: sigmoid; the choice adds `e_score_correction_bias`, picks `topk_group` groups by the sum of
their two best choice scores, then top-k inside them; weights are the sigmoid scores (no bias),
renormalised with `norm_topk_prob`, x `routed_scaling_factor`. Because of the bias a -inf logit
does not stop a pick, so V3 masks the choice scores instead.

Slicing a group-limited router is exact only when every group keeps the same number of
experts: then the sliced model still has `n_group` equal contiguous groups.
"""

from __future__ import annotations

import torch

from ..errors import MoepruneError
from .base import NEG_INF, MoEAdapter, equal_group_counts, masked


def _dense_or_sparse(config) -> list[int]:
    types = getattr(config, "mlp_layer_types", None)
    if types:
        return [i for i, t in enumerate(types) if t == "sparse"]
    first = int(getattr(config, "first_k_dense_replace", 0) or 0)
    return list(range(first, config.num_hidden_layers))


def _group_mask(group_scores: torch.Tensor, topk_group: int, n_group: int, n_experts: int) -> torch.Tensor:
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts).bool()


class _DeepseekBase(MoEAdapter):
    num_experts_field = "n_routed_experts"
    min_per_group = 1

    def moe_layers(self, config):
        return _dense_or_sparse(config)

    def extra_layers(self, config):
        # V3/R1 store their MTP module as layer num_hidden_layers (61 on the hub)
        n = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
        return list(range(config.num_hidden_layers, config.num_hidden_layers + n))

    def _grouped(self, config) -> bool:
        return True

    def groups(self, config):
        n_group = int(getattr(config, "n_group", None) or 1)
        if not self._grouped(config) or n_group <= 1:
            return None
        return {"n_group": n_group, "topk_group": int(config.topk_group), "min_per_group": self.min_per_group}

    def check_keep(self, config, kept):
        super().check_keep(config, kept)
        if self.groups(config) is None:
            return
        n_group = int(config.n_group)
        counts = equal_group_counts(kept, self.num_experts(config), n_group)
        if len(set(counts)) != 1 or counts[0] < self.min_per_group:
            raise MoepruneError(
                f"{self.family} routes in {n_group} expert groups: every group must keep the same number "
                f"of experts (>= {self.min_per_group}); got {counts} per group"
            )
        if counts[0] * int(config.topk_group) < self.top_k(config):
            raise MoepruneError(
                f"{self.family}: {counts[0]} experts per group x topk_group={config.topk_group} is fewer than "
                f"top-k = {self.top_k(config)}"
            )


class DeepseekV2Adapter(_DeepseekBase):
    family = "DeepSeek-V2"
    model_types = ("deepseek_v2",)

    def _grouped(self, config) -> bool:
        return getattr(config, "topk_method", "greedy") == "group_limited_greedy"

    def route(self, router, logits, keep=None):
        scores = torch.softmax(masked(logits, keep), dim=-1, dtype=torch.float32)
        if router.topk_method == "greedy":
            weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        elif router.topk_method == "group_limited_greedy":
            n_group, n = router.num_group, router.num_experts
            group_scores = scores.view(-1, n_group, n // n_group).max(dim=-1).values
            score_mask = _group_mask(group_scores, router.topk_group, n_group, n)
            scores = scores.masked_fill(~score_mask, 0.0)
            weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        else:
            raise MoepruneError(f"DeepSeek-V2 topk_method {router.topk_method!r} is not supported")
        return weights * router.routed_scaling_factor, indices


class DeepseekV3Adapter(_DeepseekBase):
    family = "DeepSeek-V3"
    model_types = ("deepseek_v3",)
    router_tensors = ("weight", "e_score_correction_bias")
    min_per_group = 2  # the group score is the sum of a group's two best experts

    def router_probs(self, router, logits):
        # Sigmoid scores do not sum to one; normalise them so TCESS reads as a share.
        scores = logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)

    def route(self, router, logits, keep=None):
        n_group, n = router.num_group, router.num_experts
        scores = logits.float().sigmoid()
        choice = masked(scores + router.e_score_correction_bias, keep, NEG_INF)
        group_scores = choice.view(-1, n_group, n // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        score_mask = _group_mask(group_scores, router.topk_group, n_group, n)
        choice = choice.masked_fill(~score_mask, NEG_INF)
        indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, indices


ADAPTERS = [DeepseekV2Adapter(), DeepseekV3Adapter()]
