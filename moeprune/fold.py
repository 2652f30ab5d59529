"""Folding: merge each pruned expert into its most similar kept expert (HC-SMoE / M-SMoE style).

Plain pruning drops what the pruned experts computed. Folding keeps some of it: in every MoE
layer, each pruned expert p is assigned to the kept expert k it is most similar to, and each
kept expert's weights become the routing-mass-weighted average of itself and the experts
assigned to it,

    W_k' = (m_k W_k + sum_p m_p W_p) / (m_k + sum_p m_p)

for every fused expert tensor the architecture's adapter names (gate/up/down, and their biases
where the family has them), with m the routing mass of the profile (`stats["mass"]`: the summed
gate weight each expert received on the calibration prompts). Routers are left unchanged: a
token that chose a pruned expert now falls to the kept experts the router prefers next.

Similarity (`similarity=`):

- "router" (default): cosine of the experts' router rows. Permutation-invariant (two experts
  that compute the same function with their hidden units in another order have unrelated
  flattened weights but, when the router learnt to treat them alike, similar router rows), and it
  says which experts receive the same tokens, which is what a pruned expert's tokens need.
- "weights": cosine of the experts' flattened weights (all fused tensors, concatenated).

The benchmark (`moeprune.bench`, `fold_*` settings) compares folded against plain pruning on
held-out text; this module is not part of moeprune's public API (see README).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import MoepruneError
from .pattern import Pattern
from .routers import get_adapter

SIMILARITIES = ("router", "weights")


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        try:
            return model.get_buffer(name)
        except AttributeError:
            raise MoepruneError(f"the model has no tensor {name} (is it a full model with every expert?)") from None


def assignments(model: nn.Module, pattern: Pattern, similarity: str = "router") -> dict[int, dict[int, int]]:
    """Layer -> {pruned expert: the kept expert it folds into} (most similar by cosine)."""
    if similarity not in SIMILARITIES:
        raise MoepruneError(f"unknown similarity {similarity!r}; choose one of: {', '.join(SIMILARITIES)}")
    adapter = get_adapter(model)
    n = adapter.num_experts(model.config)
    out = {}
    for layer, kept in pattern.kept.items():
        pruned = [e for e in range(n) if e not in set(kept)]
        if not pruned:
            out[layer] = {}
            continue
        if similarity == "router":
            rows = _tensor(model, adapter.router_keys(layer)[0]).detach().float()
        else:
            rows = torch.cat([_tensor(model, k).detach().float().reshape(n, -1) for k in adapter.fused_keys(layer)],
                             dim=1)
        rows = torch.nn.functional.normalize(rows, dim=1)
        sim = rows[pruned] @ rows[kept].T  # [pruned, kept]
        best = sim.argmax(dim=1).tolist()
        out[layer] = {p: kept[b] for p, b in zip(pruned, best, strict=True)}
    return out


@torch.no_grad()
def fold(model: nn.Module, pattern: Pattern, profile, similarity: str = "router") -> nn.Module:
    """Fold `pattern`'s pruned experts into its kept ones, in place, on a loaded full model (every
    expert present); returns the model. Only the kept experts' weights change, so the model
    under `pattern`'s keep-mask (or `slice_state_dict` of its state dict) is the folded slim model.
    Experts with no routing mass in the profile contribute nothing; a kept expert whose group has
    no mass at all is left as it is."""
    adapter = get_adapter(model)
    n = adapter.num_experts(model.config)
    if pattern.meta.get("num_experts", n) != n or profile.num_experts != n:
        raise MoepruneError(f"pattern, profile and model disagree on the expert count ({n} in the model)")
    layers = profile.moe_layers
    missing = [layer for layer in pattern.kept if layer not in layers]
    if missing:
        raise MoepruneError(f"the profile has no routing mass for MoE layers {missing}")
    mass_all = profile.stats["mass"]
    for layer, groups in assignments(model, pattern, similarity).items():
        if not groups:
            continue
        mass = mass_all[layers.index(layer)].double()
        members: dict[int, list[int]] = {}
        for p, k in groups.items():
            members.setdefault(k, []).append(p)
        for name in adapter.fused_keys(layer):
            t = _tensor(model, name)
            if not t.is_floating_point() or t.element_size() < 2:
                raise MoepruneError(f"{name} is {t.dtype}: folding needs dequantized float weights")
            for k, ps in members.items():
                ids = [k, *ps]
                m = mass[ids]
                total = float(m.sum())
                if total <= 0:
                    continue
                w = (m / total).to(torch.float32).view(-1, *([1] * (t.dim() - 1)))
                t[k] = (t[ids].float() * w).sum(dim=0).to(t.dtype)
    return model
