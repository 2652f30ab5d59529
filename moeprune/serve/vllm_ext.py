"""Swap the experts of a running vLLM engine for another stored pattern's, writing only those that differ.

Start vLLM on a moeprune export (it holds `pattern.json`) with

    VLLM_SERVER_DEV_MODE=1 vllm serve EXPORT --worker-extension-cls moeprune.serve.vllm_ext.ExpertSwap

and call, through `LLM.collective_rpc` or the server's `POST /collective_rpc`:

- `moeprune_resident()`: which source expert each slot of each layer holds, and the pattern's name/digest;
- `moeprune_swap(spec)`: `spec` is JSON `{"name", "pattern": Pattern.to_dict(), "source": FOLDER}` with
  FOLDER the full source checkpoint. Experts held by both patterns keep their slots; each incoming
  expert takes the slot of an outgoing one (`slot_plan`). Only the incoming experts' bytes are read,
  through the same plan `moeprune export` writes from (`exporter.export_plan`), so the engine gets
  exactly the tensors an export would have given it, named for their new slots. They go through the
  layer's own `weight_loader` and `quant_method.process_weights_after_loading` on a scratch copy of
  the layer (tensor-parallel slicing, the EP expert map and kernel layouts, such as the CPU backend's
  prepacking, are vLLM's own code), then their rows are copied into the live tensors in place. Router
  rows are rewritten in slot order. The front (`moeprune route --engine`) drains the engine first and
  clears its prefix cache after: no request runs on two patterns' experts, nor reuses a prefix
  computed with the old ones.

The engine's slots per layer are fixed by the export it started on: a pattern with another count in
some layer is refused. Quantized sources are refused (only unquantized swaps have been checked
against a fresh engine). This module imports vLLM only inside the worker.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoepruneError
from ..pattern import Pattern

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerSwap:
    """One layer's swap: `order[s]` is the source expert slot s holds afterwards; `writes` the (slot,
    expert) pairs to write (the incoming experts)."""

    order: tuple[int, ...]
    writes: tuple[tuple[int, int], ...]


def slot_plan(resident: list[int], target: list[int]) -> LayerSwap:
    """Keep the experts both hold in their slots; put incoming experts, in `target`'s order, into the
    slots of outgoing ones, lowest slot first."""
    if len(set(target)) != len(target):
        raise MoepruneError(f"the target keeps an expert twice: {sorted(target)}")
    if len(target) != len(resident):
        raise MoepruneError(f"the engine holds {len(resident)} experts in this layer and the pattern keeps "
                            f"{len(target)}; a swap keeps the engine's slot count")
    both = set(resident) & set(target)
    incoming = [e for e in target if e not in both]
    free = [s for s, e in enumerate(resident) if e not in both]
    order = list(resident)
    for s, e in zip(free, incoming, strict=True):
        order[s] = e
    return LayerSwap(tuple(order), tuple(zip(free, incoming, strict=True)))


def plan_swap(resident: dict[int, list[int]], target: Pattern) -> dict[int, LayerSwap]:
    """`slot_plan` for every layer; the pattern must cover exactly the engine's MoE layers."""
    if set(target.kept) != set(resident):
        raise MoepruneError(f"the pattern covers MoE layers {sorted(target.kept)}, the engine "
                            f"{sorted(resident)}")
    plans = {}
    for layer, ids in target.kept.items():
        try:
            plans[layer] = slot_plan(resident[layer], ids)
        except MoepruneError as e:
            raise MoepruneError(f"layer {layer}: {e}") from None
    return plans


def _detached(module):
    """A shallow copy of an nn.Module whose parameter, buffer and child tables are its own, so that
    registering on it leaves `module` untouched."""
    out = copy.copy(module)
    out.__dict__["_parameters"] = OrderedDict()
    out.__dict__["_buffers"] = OrderedDict(module._buffers)
    out.__dict__["_modules"] = OrderedDict(module._modules)
    return out


class ExpertSwap:
    """vLLM worker extension (`--worker-extension-cls moeprune.serve.vllm_ext.ExpertSwap`)."""

    # ------------------------------------------------------------------ state
    def _moeprune_state(self) -> dict:
        state = self.__dict__.get("_moeprune")
        if state is None:
            folder = Path(self.vllm_config.model_config.model)
            try:
                pattern = Pattern.load(folder / "pattern.json")
            except (OSError, MoepruneError) as e:
                raise MoepruneError(f"the engine's model {folder} is not a moeprune export with its pattern.json "
                                    f"({e})") from None
            state = {"name": (pattern.meta.get("domains") or [None])[0], "digest": pattern.digest,
                     "slots": {layer: list(ids) for layer, ids in pattern.kept.items()}, "sources": {}}
            self.__dict__["_moeprune"] = state
        return state

    def moeprune_resident(self) -> dict:
        try:
            s = self._moeprune_state()
        except MoepruneError as e:
            return {"error": str(e)}
        return {"name": s["name"], "digest": s["digest"],
                "kept": None if s["slots"] is None else {str(k): v for k, v in s["slots"].items()}}

    def moeprune_memory(self) -> dict:
        """Bytes of the model's parameters and buffers (each tensor once), and this worker's RSS."""
        model = self.model_runner.get_model()
        seen, total = set(), 0
        for t in (*model.parameters(), *model.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        rss = None
        try:
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
        return {"weight_bytes": total, "rss_bytes": rss}

    def _source(self, folder: str):
        """The source checkpoint, opened once, its routers read once (outside any swap's byte count)."""
        from ..checkpoint import Checkpoint

        sources = self._moeprune_state()["sources"]
        if folder not in sources:
            for old, *_ in sources.values():  # one source at a time: what callers send cannot pile up
                old.close()
            sources.clear()
            ckpt = Checkpoint(folder)  # counts bytes read; no log of each read (an engine runs for days)
            try:
                if ckpt.codec.name != "none":
                    raise MoepruneError(f"{folder} is quantized ({ckpt.codec.describe()}): in-engine swaps are "
                                        f"checked for unquantized experts only; serve one engine per export instead")
                routers = ckpt.read_routers()
            except BaseException:
                ckpt.close()
                raise
            sources[folder] = (ckpt, routers, ckpt.fingerprint(routers))
        return sources[folder]

    # ------------------------------------------------------------------ swap
    def moeprune_swap(self, spec: str) -> dict:
        """Swap to the pattern in `spec` (JSON); returns what was done, or {"error": ...}."""
        try:
            return self._swap(spec)
        except MoepruneError as e:
            return {"error": str(e)}
        except Exception as e:  # an engine-side failure: report it, the front marks the engine unusable
            return {"error": f"{type(e).__name__}: {e}"}

    def _swap(self, spec: str) -> dict:
        from ..exporter import export_plan

        try:
            data = json.loads(spec)
            name, source = data["name"], data["source"]
            target = Pattern.from_dict(data["pattern"], source="the swap's pattern")
        except (ValueError, KeyError, TypeError) as e:
            raise MoepruneError(f"malformed swap request: {e}") from None
        state = self._moeprune_state()
        if state["slots"] is None:
            raise MoepruneError("an earlier swap failed half way; restart the engine")
        ckpt, routers, fingerprint = self._source(source)
        if target.fingerprint != fingerprint:
            raise MoepruneError(f"pattern {name} belongs to another model than {source}")
        plans = plan_swap(state["slots"], target)
        t0 = time.perf_counter()
        read0 = ckpt.reader.bytes_read
        order = {layer: list(p.order) for layer, p in plans.items()}
        writes = {(layer, s) for layer, p in plans.items() for s, _ in p.writes}
        routers_by_key = {ck: layer for layer in plans for ck in ckpt.adapter.ckpt_router_keys(layer)}
        per_layer: dict[int, tuple[list, list]] = {layer: ([], []) for layer in plans}
        for item in export_plan(ckpt, order, routers):
            split = ckpt.adapter.split_expert_key(item.name)
            if split is not None and (split[0], split[1]) in writes:
                per_layer[split[0]][0].append(item)
            elif item.name in routers_by_key:
                per_layer[routers_by_key[item.name]][1].append(item)
        model = self.model_runner.get_model()
        experts = _routed_experts(model)
        state["slots"] = None  # until every layer is written, the engine holds no known pattern
        written = 0
        for layer, (expert_items, router_items) in per_layer.items():
            if layer not in experts:
                raise MoepruneError(f"the engine has no routed experts for MoE layer {layer}")
            weights = [(i.name, ckpt.adapter.split_expert_key(i.name)[1], i.load) for i in expert_items]
            if weights:
                _write_experts(model, experts[layer], weights)
            _write_router(model, [(i.name, i.load()) for i in router_items])
            written += len({slot for _, slot, _ in weights})
        state.update(slots=order, name=name, digest=target.digest)
        return {"name": name, "digest": target.digest, "bytes_read": ckpt.reader.bytes_read - read0,
                "seconds": time.perf_counter() - t0, "experts_written": written}


# ---------------------------------------------------------------------- vLLM side
def _routed_experts(model) -> dict:
    """MoE layer index -> the module holding its routed experts' weights (vLLM's RoutedExperts)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    out = {}
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            m = _LAYER.search(module.layer_name + ".")
            if m:
                out[int(m.group(1))] = module
    return out


def _mapped(model, weights: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Checkpoint names as the model's loader sees them (its hf -> vLLM name mapper)."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    return list(mapper.apply(weights)) if mapper is not None else weights


def _write_experts(model, live, weights: list[tuple[str, int, Callable[[], object]]]) -> None:
    """Load `weights` ((checkpoint name, slot, read) of the incoming experts' tensors) into a scratch
    copy of `live` through vLLM's loader and post-processing, then copy those slots' rows in place.
    Only the slots this rank holds are read (expert parallelism places the others elsewhere)."""
    import torch

    prefix = live.layer_name + "."
    rows = {slot: live._map_global_expert_id_to_local_expert_id(slot) for _, slot, _ in weights}
    mine = [(name, read) for name, slot, read in weights if rows[slot] >= 0]
    if not mine:
        return
    local = []
    for name, tensor in _mapped(model, [(name, read()) for name, read in mine]):
        if not name.startswith(prefix):
            raise MoepruneError(f"vLLM names this model's experts differently ({name} is not under "
                                f"{live.layer_name}); in-engine swaps do not support this family")
        local.append((name[len(prefix):], tensor))
    scratch = _detached(live)
    method = _detached(live.quant_method)
    method.moe_kernel, method.moe_quant_config = None, None  # a first load: build the kernel layout anew
    scratch.quant_method = method
    method.create_weights(layer=scratch, num_experts=live.local_num_experts, hidden_size=live.hidden_size,
                          unpadded_hidden_size=live.moe_config.hidden_dim_unpadded,
                          intermediate_size_per_partition=live.moe_config.intermediate_size_per_partition,
                          params_dtype=live.params_dtype, weight_loader=scratch.weight_loader,
                          global_num_experts=live.moe_config.num_experts)
    with torch.no_grad():
        for p in scratch.parameters(recurse=False):
            p.zero_()  # the rows not loaded are never copied; zeros keep the post-processing finite
        taken = sum(1 for _ in scratch.load_weights(local))  # once per expert tensor it took
        if taken != len(local):
            raise MoepruneError(f"vLLM's loader took {taken} of the {len(local)} expert tensors of {live.layer_name} "
                                f"this rank holds")
        method.process_weights_after_loading(scratch)
        index = torch.as_tensor(sorted({r for r in rows.values() if r >= 0}), dtype=torch.long)
        for pname, new in scratch.named_parameters(recurse=False):
            old = getattr(live, pname, None)
            if old is None or old.shape != new.shape:
                raise MoepruneError(f"the scratch layer's {pname} {tuple(new.shape)} does not match the engine's "
                                    f"{None if old is None else tuple(old.shape)}")
            if index.numel():
                old.data.index_copy_(0, index.to(old.device), new.data.index_select(0, index.to(new.device)))


def _write_router(model, weights: list[tuple[str, object]]) -> None:
    """Rewrite router tensors (already in slot order): in place where the live tensor keeps the
    checkpoint's shape (CUDA graphs hold its address), else (the CPU backend packs the router's
    weight into its kernel) as a new parameter re-processed by the router's own quant method."""
    import torch

    for name, tensor in _mapped(model, weights):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        with torch.no_grad():
            if tuple(old.shape) == tuple(tensor.shape):
                old.data.copy_(tensor.to(old.dtype))
                continue
            method = getattr(owner, "quant_method", None)
            if attr != "weight" or method is None:
                raise MoepruneError(f"cannot rewrite router tensor {name}: the engine holds it as "
                                    f"{tuple(old.shape)}, the checkpoint as {tuple(tensor.shape)}")
            dtype = old.dtype if old.is_floating_point() else tensor.dtype
            setattr(owner, attr, torch.nn.Parameter(tensor.to(device=old.device, dtype=dtype), requires_grad=False))
            method.process_weights_after_loading(owner)
