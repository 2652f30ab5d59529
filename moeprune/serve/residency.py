"""Expert residency: one loaded backbone, routed experts swapped in and out per request.

`ExpertPool(path, budget)` loads everything of a checkpoint except its routed experts (attention,
norms, embeddings, shared experts, dense layers) and, per MoE layer, the full router (all E rows:
it is small, and its logits stay over the original expert ids). Each experts module holds
`budget` slots instead of E experts. A request's pattern is served in two steps:

    with pool.activate(pattern) as lease, pool.forward_context(lease):
        model(...)                                 # or: with pool.serve(pattern) as lease: ...

`activate` gives every kept expert that is not resident a slot (a free one, else the least
recently used slot whose expert no in-flight request holds and this pattern does not keep), reads
only those experts' bytes from the safetensors checkpoint into their slots, and pins the pattern's
experts until the lease is released. `forward_context` routes exactly like `load_slim(path,
pattern)`: the router's logits over all E experts are masked to the pattern (`adapter.route`,
the same maths `keep_mask` uses), and the chosen original ids are mapped to slot ids before the
experts module sees them.

Threads: pool bookkeeping (planning, loading, pinning, releasing) runs under one lock, so one
activation loads at a time. Forward passes take no lock: the router hooks are installed once and
read the pattern of the calling thread (`forward_context` is thread-local), and a load never
writes a slot that an in-flight request can route to, so requests with different patterns can run
on several threads at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..budget import resolve_count
from ..checkpoint import Checkpoint, check_pattern, run_reads
from ..errors import MoepruneError
from ..models import load_tokenizer
from ..pattern import Pattern, as_pattern

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_budget(budget: int | float, n_experts: int, top_k: int) -> int:
    """Slots per MoE layer for `budget`: an expert count, or a fraction of a layer's experts (rounded up)."""
    slots = resolve_count(budget, n_experts, "the expert budget")
    if slots < top_k:
        raise MoepruneError(f"an expert budget of {slots} slots per layer is below top-k = {top_k}: "
                            f"every token is routed to {top_k} experts")
    return slots


def _load_tokenizer(path: str):
    """The folder's tokenizer, or None when it has none (a pool can serve without one)."""
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return load_tokenizer(path)




@dataclass
class _LayerSlots:
    """Residency of one MoE layer."""

    slot_of: torch.Tensor  # LongTensor [E]: original expert id -> slot, or -1
    expert_in_slot: list[int | None]
    last_used: list[int]  # per slot: the tick of its last activation or release
    pins: list[int]  # per original expert: how many live leases hold it

    def resident(self) -> list[int]:
        return sorted(e for e in self.expert_in_slot if e is not None)


# layer -> (keep mask [E] bool, original id -> slot [E] long), on the model's device
Routes = dict[int, tuple[torch.Tensor, torch.Tensor]]


class Lease:
    """One activation of a pattern: its experts stay resident until `release()` (or the `with` block ends).

    `bytes_read`: checkpoint bytes this activation read; `loaded` / `evicted`: layer -> original ids
    of the experts it brought in / pushed out.
    """

    def __init__(self, pool: ExpertPool, pattern: Pattern, bytes_read: int,
                 loaded: dict[int, list[int]], evicted: dict[int, list[int]], routes: Routes):
        self.pool = pool
        self.pattern = pattern
        self.bytes_read = bytes_read
        self.loaded = loaded
        self.evicted = evicted
        self._routes = routes
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @property
    def n_loaded(self) -> int:
        return sum(len(v) for v in self.loaded.values())

    @property
    def n_evicted(self) -> int:
        return sum(len(v) for v in self.evicted.values())

    def release(self) -> None:
        """Unpin the pattern's experts (they stay resident until evicted). Releasing twice is a no-op."""
        self.pool._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "active"
        return (f"Lease({state}, {self.pattern.n_kept} experts, loaded {self.n_loaded}, "
                f"evicted {self.n_evicted}, {self.bytes_read} bytes)")


class ExpertPool:
    """A model whose routed experts live in `budget` slots per MoE layer, loaded on demand per pattern.

    `budget`: experts per MoE layer held at once (int, top-k..E), or a fraction of a layer's
    experts (float in (0, 1], rounded up). `verify`: refuse patterns made for another model
    (fingerprint), as `load_slim` does. The pool keeps the checkpoint's shards open until `close()`.
    Quantized checkpoints (block FP8) are decoded into `dtype` as experts are loaded, as in `load_slim`.

    Attributes: `model` (the transformers model: its config says `budget` experts, its routers hold
    all E), `adapter`, `tokenizer` (None when the folder has none), `fingerprint`, `budget`,
    `num_experts`, `layers` (MoE layer indices), `backbone_bytes` (bytes read at construction).
    """

    def __init__(self, model_path: str | os.PathLike, budget: int | float, dtype=None,
                 device: str | torch.device = "cpu", threads: int = 4, verify: bool = True):
        ckpt = Checkpoint(model_path)
        try:
            self.path = path = ckpt.folder
            self.config = config = ckpt.config
            self.adapter = adapter = ckpt.adapter
            self.layers = ckpt.layers
            self.num_experts = ckpt.num_experts
            self.top_k = adapter.top_k(config)
            self.budget = resolve_budget(budget, self.num_experts, self.top_k)
            self.device = torch.device(device)
            self.threads = threads
            self.verify = verify

            routers = ckpt.read_routers()
            self.fingerprint = ckpt.fingerprint(routers)
            # the experts modules hold `budget` slots; the routers keep every row: logits over original ids
            model = ckpt.skeleton(ckpt.model_config(self.budget), ckpt.dtype(dtype),
                                  dict.fromkeys(self.layers, self.budget), dict.fromkeys(self.layers, self.num_experts))
            ckpt.load_into(model, routers, None, threads)
            self.backbone_bytes = ckpt.reader.bytes_read
            for layer in self.layers:  # empty slots, allocated where the model will live
                for name in adapter.fused_keys(layer):
                    meta = model.get_parameter(name)
                    ckpt.fill(model, {name: torch.zeros(meta.shape, dtype=meta.dtype, device=self.device)})
            ckpt.finish(model)
            model.eval().to(self.device)
        except BaseException:
            ckpt.close()
            raise
        model.config._name_or_path = str(path)
        model.moeprune_source_fingerprint = self.fingerprint
        self.model = model
        self.tokenizer = _load_tokenizer(path)

        self._ckpt = ckpt
        self._reader = ckpt.reader
        self._lock = threading.Lock()
        self._local = threading.local()
        self._tick = 0
        self._loads = 0
        self._evictions = 0
        self._bytes_read = 0
        self._leases: set[Lease] = set()
        self._closed = False
        self._slots = {
            layer: _LayerSlots(
                slot_of=torch.full((self.num_experts,), -1, dtype=torch.long),
                expert_in_slot=[None] * self.budget,
                last_used=[0] * self.budget,
                pins=[0] * self.num_experts,
            )
            for layer in self.layers
        }
        self._handles = [adapter.router(block).register_forward_hook(self._router_hook(layer))
                         for layer, block in adapter.blocks(model)]

    # ------------------------------------------------------------------ routing
    def _router_hook(self, layer: int):
        adapter, local = self.adapter, self._local  # not `self`: the hook must not keep the pool alive

        def hook(router, args, output):
            stack = getattr(local, "routes", None)
            if not stack:
                raise MoepruneError("the ExpertPool's model ran outside pool.forward_context(...) or "
                                    "pool.serve(...): its expert slots only have a meaning for a pattern")
            keep, slot_map = stack[-1][layer]
            logits = output[0]
            weights, indices = adapter.route(router, logits, keep)
            return (logits, weights, slot_map[indices], *output[3:])

        return hook

    # ------------------------------------------------------------------ requests
    def _check_open(self) -> None:
        if self._closed:
            raise MoepruneError("this ExpertPool is closed")

    def _check(self, pattern: Pattern) -> None:
        check_pattern(pattern, self.config, self.adapter, self.fingerprint if self.verify else None)
        for layer, n in pattern.counts.items():
            if n > self.budget:
                raise MoepruneError(f"layer {layer}: the pattern keeps {n} experts, more than the pool's expert "
                                    f"budget of {self.budget} per layer; select fewer experts or build the "
                                    f"pool with a budget of at least {max(pattern.counts.values())}")

    def activate(self, pattern: Pattern | str | os.PathLike) -> Lease:
        """Make `pattern`'s experts resident and pin them until the returned lease is released."""
        pattern = as_pattern(pattern)
        self._check(pattern)
        with self._lock:
            self._check_open()
            plan = self._plan(pattern)
            bytes_read, loaded, evicted = self._load(plan)
            self._tick += 1
            for layer, ids in pattern.kept.items():
                st = self._slots[layer]
                for e in ids:
                    st.pins[e] += 1
                    st.last_used[int(st.slot_of[e])] = self._tick
            lease = Lease(self, pattern, bytes_read, loaded, evicted, self._routes(pattern))
            self._leases.add(lease)
            return lease

    def _plan(self, pattern: Pattern) -> dict[int, list[tuple[int, int]]]:
        """Layer -> [(expert to load, slot)] for the pattern's non-resident experts; nothing changes yet."""
        plan = {}
        for layer, ids in pattern.kept.items():
            st = self._slots[layer]
            missing = [e for e in ids if st.slot_of[e] < 0]
            if not missing:
                continue
            wanted = set(ids)
            free = [s for s, e in enumerate(st.expert_in_slot) if e is None]
            evictable = sorted((st.last_used[s], s) for s, e in enumerate(st.expert_in_slot)
                               if e is not None and st.pins[e] == 0 and e not in wanted)
            slots = free + [s for _, s in evictable]
            if len(missing) > len(slots):
                pinned = sum(1 for e in st.expert_in_slot if e is not None and st.pins[e] > 0)
                raise MoepruneError(
                    f"expert budget exhausted in layer {layer}: the pattern needs {len(missing)} experts that are "
                    f"not resident, but only {len(slots)} of the {self.budget} slots are free or hold experts that "
                    f"no request needs ({pinned} are pinned by {len(self._leases)} request(s) in flight); wait for "
                    f"a lease to be released or build the pool with a larger budget")
            plan[layer] = list(zip(missing, slots, strict=False))
        return plan

    def _load(self, plan: dict[int, list[tuple[int, int]]]):
        """Read the planned experts layer by layer and write them into their slots.

        One layer is staged at a time, so loading costs at most one layer's experts of extra memory.
        Each layer commits (data, then bookkeeping) on its own: if a read fails, the layers before it
        hold their new experts consistently, the failing layer is untouched, and the error propagates.
        """
        reader = self._reader
        dtype = self.model.get_parameter(self.adapter.fused_keys(self.layers[0])[0]).dtype
        bytes_read = 0
        loaded: dict[int, list[int]] = {}
        evicted: dict[int, list[int]] = {}
        try:
            for layer, pairs in plan.items():
                before = reader.bytes_read
                staged, jobs = self._ckpt.expert_reads(layer, [e for e, _ in pairs], dtype)
                run_reads(jobs, self.threads)
                bytes_read += reader.bytes_read - before
                st = self._slots[layer]
                with torch.no_grad():
                    for name, buf in staged.items():
                        param = self.model.get_parameter(name)
                        index = torch.tensor([s for _, s in pairs], dtype=torch.long, device=param.device)
                        param.index_copy_(0, index, buf.to(device=param.device, dtype=param.dtype))
                del staged, jobs
                for e, s in pairs:
                    old = st.expert_in_slot[s]
                    if old is not None:
                        st.slot_of[old] = -1
                        evicted.setdefault(layer, []).append(old)
                    st.expert_in_slot[s] = e
                    st.slot_of[e] = s
                    loaded.setdefault(layer, []).append(e)
        finally:
            self._loads += sum(len(v) for v in loaded.values())
            self._evictions += sum(len(v) for v in evicted.values())
            self._bytes_read += bytes_read
        return bytes_read, loaded, {layer: sorted(v) for layer, v in evicted.items()}

    def _routes(self, pattern: Pattern) -> Routes:
        device = self.device
        out = {}
        for layer, ids in pattern.kept.items():
            index = torch.as_tensor(ids, dtype=torch.long)
            keep = torch.zeros(self.num_experts, dtype=torch.bool)
            keep[index] = True
            slot_map = torch.full((self.num_experts,), -1, dtype=torch.long)
            slot_map[index] = self._slots[layer].slot_of[index]
            out[layer] = (keep.to(device), slot_map.to(device))
        return out

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            self._leases.discard(lease)
            self._tick += 1
            for layer, ids in lease.pattern.kept.items():
                st = self._slots[layer]
                for e in ids:
                    st.pins[e] -= 1
                    st.last_used[int(st.slot_of[e])] = self._tick

    @contextlib.contextmanager
    def forward_context(self, pattern_or_lease: Pattern | Lease | str | os.PathLike) -> Iterator[None]:
        """Within the block, this thread's forwards route to the pattern's experts, as `load_slim` would.

        The pattern's experts must be held by a live lease (`activate`) for the whole block.
        """
        if isinstance(pattern_or_lease, Lease):
            lease = pattern_or_lease
            if lease.pool is not self:
                raise MoepruneError("this lease belongs to another ExpertPool")
            if lease.released:
                raise MoepruneError("this lease was released: activate the pattern again")
            routes = lease._routes
        else:
            pattern = as_pattern(pattern_or_lease)
            self._check(pattern)
            with self._lock:
                self._check_open()
                for layer, ids in pattern.kept.items():
                    unpinned = [e for e in ids if self._slots[layer].pins[e] == 0]
                    if unpinned:
                        raise MoepruneError(f"layer {layer}: experts {unpinned} are not held by an active lease; "
                                            f"call pool.activate(pattern) first (or use pool.serve(pattern))")
                routes = self._routes(pattern)
        stack = self._local.__dict__.setdefault("routes", [])
        stack.append(routes)
        try:
            yield
        finally:
            stack.pop()

    @contextlib.contextmanager
    def serve(self, pattern: Pattern | str | os.PathLike) -> Iterator[Lease]:
        """`activate` and `forward_context` in one block; yields the lease."""
        with self.activate(pattern) as lease, self.forward_context(lease):
            yield lease

    # ------------------------------------------------------------------ introspection
    def resident_experts(self) -> dict[int, list[int]]:
        """Layer -> sorted original ids of the experts now in slots."""
        with self._lock:
            return {layer: st.resident() for layer, st in self._slots.items()}

    @property
    def stats(self) -> dict:
        """Cumulative `loads`, `evictions`, `bytes_read` (expert bytes read by activations), the
        construction's `backbone_bytes`, `active_leases`, and per layer `resident` and `pinned` counts."""
        with self._lock:
            return {
                "budget": self.budget,
                "loads": self._loads,
                "evictions": self._evictions,
                "bytes_read": self._bytes_read,
                "backbone_bytes": self.backbone_bytes,
                "active_leases": len(self._leases),
                "resident": {layer: len(st.resident()) for layer, st in self._slots.items()},
                "pinned": {layer: sum(1 for p in st.pins if p > 0) for layer, st in self._slots.items()},
            }

    def close(self) -> None:
        """Remove the router hooks and close the checkpoint; the pool takes no more activations."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for handle in self._handles:
                handle.remove()
            self._ckpt.close()

    def __enter__(self) -> ExpertPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ExpertPool({self.adapter.family}, {self.budget} of {self.num_experts} experts per layer, "
                f"{len(self.layers)} MoE layers, {len(self._leases)} leases)")
