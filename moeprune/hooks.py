"""Seeing inside a transformers MoE forward, and steering its routing.

Fused experts hide per-expert outputs from module hooks, so `record_experts` registers an
experts implementation (transformers' `ExpertsInterface`) that runs the model's own kernel on
each (token, pick) pair separately, hands the unweighted per-expert outputs to a callback, and
returns the same weighted sum as the stock forward. `keep_mask` makes pruned experts
unselectable through a forward hook on each router.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .routers.base import MoEAdapter

RECORD_IMPL = "moeprune_record"

# id(experts module) -> (inner experts forward, callback). Set only inside `record_experts`.
_ACTIVE: dict[int, tuple[Callable, Callable]] = {}

ExpertsCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _inner_forward(module: nn.Module, implementation: str | None) -> Callable:
    """The experts forward the model used before moeprune stepped in."""
    if implementation and implementation != "eager" and implementation in ALL_EXPERTS_FUNCTIONS:
        return ALL_EXPERTS_FUNCTIONS[implementation]
    # The class forward is wrapped by `use_experts_implementation`; `__wrapped__` is the eager loop.
    return type(module).forward.__wrapped__


def _recording_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    entry = _ACTIVE.get(id(self))
    if entry is None:  # an experts module nobody asked to watch: behave like the default
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    inner, callback = entry
    n_tokens, k = top_k_index.shape
    # One row per (token, pick) with weight 1: the stock kernel then returns unweighted outputs.
    rows = hidden_states.repeat_interleave(k, dim=0)
    ones = torch.ones(n_tokens * k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
    per_pick = inner(self, rows, top_k_index.reshape(-1, 1), ones).view(n_tokens, k, -1)
    routed = (per_pick * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)
    callback(top_k_index, top_k_weights, per_pick, routed)
    return routed


ALL_EXPERTS_FUNCTIONS.register(RECORD_IMPL, _recording_experts_forward)


@contextlib.contextmanager
def record_experts(model: nn.Module, callbacks: dict[nn.Module, ExpertsCallback]) -> Iterator[None]:
    """Within the block, each experts module in `callbacks` reports
    (indices [T,K], weights [T,K], unweighted outputs [T,K,H], routed sum [T,H]) on every forward.
    The model's previous experts implementation is restored afterwards, also on error."""
    previous = model.config._experts_implementation
    for module, callback in callbacks.items():
        _ACTIVE[id(module)] = (_inner_forward(module, previous), callback)
    try:
        model.set_experts_implementation(RECORD_IMPL)
        yield
    finally:
        for module in callbacks:
            _ACTIVE.pop(id(module), None)
        model.set_experts_implementation(previous)


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove the given hook handles on exit."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def keep_mask_hooks(model: nn.Module, adapter: MoEAdapter, keep: dict[int, torch.Tensor]) -> list:
    """Register router hooks so that in layer l only experts with keep[l] True can be chosen.

    Returns the hook handles (remove them to restore the full router).
    """
    handles = []
    for layer, block in adapter.blocks(model):
        if layer not in keep:
            continue
        mask = keep[layer].bool()

        def hook(router, args, output, mask=mask):
            logits = output[0]
            weights, indices = adapter.route(router, logits, mask)
            return (logits, weights, indices, *output[3:])

        handles.append(adapter.router(block).register_forward_hook(hook))
    return handles


@contextlib.contextmanager
def keep_mask(model: nn.Module, adapter: MoEAdapter, keep: dict[int, torch.Tensor]) -> Iterator[None]:
    """Context manager form of `keep_mask_hooks`."""
    with hooks(keep_mask_hooks(model, adapter, keep)):
        yield
