"""Seeing inside a transformers MoE forward, and steering its routing.

Fused experts hide per-expert outputs from module hooks, so `record_experts` registers an
experts implementation (transformers' `ExpertsInterface`) that runs the model's own kernel on
each (token, pick) pair separately, hands the unweighted per-expert outputs to a callback, and
returns the same weighted sum as the stock forward. `keep_mask` makes pruned experts
unselectable through a forward hook on each router.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

try:  # transformers' grouped kernel wrapper: lets the recording path cost no more than the stock one
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - older/newer transformers: the generic path still works
    _grouped_linear = None

from .errors import MoepruneError
from .routers.base import MoEAdapter

RECORD_IMPL = "moeprune_record"

# id(experts module) -> (inner experts forward, callback). Set only inside `record_experts`.
_ACTIVE: dict[int, tuple[Callable, Callable]] = {}

ExpertsCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _dispatch(module: nn.Module) -> ExpertsInterface | None:
    """The experts registry `module` dispatches through (transformers keeps one for bf16 experts and
    one for native FP8 experts), or None for a module that is not a dispatching experts module."""
    forward = type(module).forward
    if not hasattr(forward, "__wrapped__"):  # not wrapped by `use_experts_implementation`
        return None
    found = inspect.getclosurevars(forward).nonlocals.get("experts_interface")
    return found if isinstance(found, ExpertsInterface) else None


def _interface(module: nn.Module) -> ExpertsInterface:
    """`_dispatch`, or a clear error for an experts module that runs a kernel of its own, such as
    native MXFP4 on a GPU, which never calls the router module: hooks would record and mask nothing."""
    found = _dispatch(module)
    if found is None:
        raise MoepruneError(
            f"experts module {type(module).__name__} runs its own kernel outside transformers' experts "
            f"interface (native quantized kernels such as MXFP4 on a GPU bypass the router module), so "
            f"moeprune could neither record nor mask it; load the model dequantized (moeprune.load_model "
            f"or a checkpoint path does)")
    return found


def check_steerable(modules) -> None:
    """Refuse, before any hook goes in, experts modules whose routing moeprune cannot see."""
    for module in modules:
        _interface(module)


def _inner_forward(module: nn.Module, implementation: str | None) -> Callable:
    """The experts forward the model used before moeprune stepped in."""
    interface = _interface(module)
    if implementation and implementation not in ("eager", RECORD_IMPL) and implementation in interface:
        return interface[implementation]
    # The class forward is wrapped by `use_experts_implementation` (transformers' FP8 loader may wrap
    # it again); the innermost function is the eager loop.
    return inspect.unwrap(type(module).forward)


def _grouped_per_pick(self, hidden_states, top_k_index):
    """Unweighted expert outputs [T, K, H] with the grouped kernel, the way `grouped_mm` computes them."""
    n_tokens, k = top_k_index.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[perm // k]
    counts = torch.histc(expert_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[expert_ids] if self.has_bias else None
    out = _grouped_linear(rows, up, offsets, bias=up_bias, is_transposed=self.is_transposed)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
    down_bias = self.down_proj_bias[expert_ids] if self.has_bias else None
    out = _grouped_linear(out, self.down_proj, offsets, bias=down_bias, is_transposed=self.is_transposed)
    if getattr(self, "has_post_expert_norm", False):  # absent before transformers 5.2x
        out = self.post_expert_norm(out)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inverse].view(n_tokens, k, -1)


def _recording_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    inner, callback = _ACTIVE.get(id(self), (None, None))
    if callback is None:  # an experts module nobody asked to watch: its own forward, unrecorded
        inner = inner or inspect.unwrap(type(self).forward)
        return inner(self, hidden_states, top_k_index, top_k_weights)
    n_tokens, k = top_k_index.shape
    if inner is _GROUPED and _grouped_linear is not None and not getattr(self, "_is_expert_parallel", False):
        per_pick = _grouped_per_pick(self, hidden_states, top_k_index)
    else:
        # Any other kernel: one row per (token, pick) with weight 1 gives unweighted outputs.
        rows = hidden_states.repeat_interleave(k, dim=0)
        ones = torch.ones(n_tokens * k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
        per_pick = inner(self, rows, top_k_index.reshape(-1, 1), ones).view(n_tokens, k, -1)
    routed = (per_pick * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)
    callback(top_k_index, top_k_weights, per_pick, routed)
    return routed


_GROUPED = ALL_EXPERTS_FUNCTIONS.get("grouped_mm")
ALL_EXPERTS_FUNCTIONS.register(RECORD_IMPL, _recording_experts_forward)
try:  # native FP8 experts dispatch through their own registry; a model switches every experts module at once
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
except ImportError:  # pragma: no cover - a transformers without native FP8 experts
    ALL_FP8_EXPERTS_FUNCTIONS = None
else:
    ALL_FP8_EXPERTS_FUNCTIONS.register(RECORD_IMPL, _recording_experts_forward)


@contextlib.contextmanager
def record_experts(model: nn.Module, callbacks: dict[nn.Module, ExpertsCallback]) -> Iterator[None]:
    """Within the block, each experts module in `callbacks` reports
    (indices [T,K], weights [T,K], unweighted outputs [T,K,H], routed sum [T,H]) on every forward.
    The model's previous experts implementation is restored afterwards, also on error."""
    previous = model.config._experts_implementation
    check_steerable(callbacks)
    # every experts module switches implementation with the model, watched or not (an MTP layer, ...)
    others = [m for m in model.modules() if m not in callbacks and _dispatch(m) is not None]
    entries = {id(m): (_inner_forward(m, previous), callbacks.get(m)) for m in [*callbacks, *others]}
    _ACTIVE.update(entries)
    try:
        model.set_experts_implementation(RECORD_IMPL)
        yield
    finally:
        for key in entries:
            _ACTIVE.pop(key, None)
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
    blocks = adapter.blocks(model)
    check_steerable(adapter.experts(block) for layer, block in blocks if layer in keep)
    n = adapter.num_experts(model.config)
    for layer, mask in keep.items():  # check everything before the first hook goes in
        if not isinstance(mask, torch.Tensor) or mask.shape != (n,):
            raise MoepruneError(f"layer {layer}: a keep-mask must be a bool tensor of shape [{n}], got "
                                f"{getattr(mask, 'shape', type(mask).__name__)}")
    missing = set(keep) - {layer for layer, _ in blocks}
    if missing:
        raise MoepruneError(f"keep-masks name layers {sorted(missing)}, which are not MoE layers of this model")
    handles = []
    for layer, block in blocks:
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
