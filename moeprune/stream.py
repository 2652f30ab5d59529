"""Run a checkpoint one decoder layer at a time: models larger than memory, profiled and evaluated exactly.

`LayerStream(path)` builds a meta-device skeleton of the model and reads nothing but the routers.
`run(batches)` then:

1. materialises the embedding and runs every batch into identity stubs put in place of the
   decoder layers, which catch each layer's keyword arguments per batch (GPT-OSS and others pass
   a different attention mask per layer type) and the hidden states entering layer 0;
2. for each decoder layer: reads it once through the checkpoint-assembly layer (quantized weights
   decoded by the codec), runs every cached batch through it (any hooks on its modules fire as
   in a whole-model forward), replaces each batch's hidden states by the layer's output and sets
   the layer back to meta. The next layer is read on a thread while this one computes;
3. optionally (`head=True`) runs the model's final norm and output head on the last hidden states
   by calling the whole model again with stubs that replay them, so any head the family has is
   the family's own code.

The same operations run on the same batches in the same order as a whole-model forward, so on one
device and dtype the results are bit-identical. With several devices (`device="cuda:0,cuda:1"`) every
device holds its own copy of the current layer and runs every n-th batch on a thread of its own: the
layer is still read once, into host buffers copied to each device. Memory: two layers in the compute dtype, the
embedding or head, and the hidden-state cache, which `memory_budget` bounds by spilling it to a
file. Each needed checkpoint byte is read once.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import bound_kernel_caches, map_large_blocks, release_freed_memory
from .checkpoint import Checkpoint, Read, run_reads, tied_names
from .errors import MoepruneError
from .pattern import Pattern

GIB = 2**30


def parse_bytes(value: int | str | None, what: str = "memory budget") -> int | None:
    """Bytes from an int or a string such as '8GB', '512MiB', '2e9'; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MoepruneError(f"{what} must be a number of bytes or a size such as '8GB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9,
                 "MB": 10**6, "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
        unit = next((u for u in units if text.endswith(u)), "")
        try:
            n = int(float(text[: len(text) - len(unit)]) * units.get(unit, 1))
        except ValueError:
            raise MoepruneError(f"{what} {value!r} is not a size (e.g. 8GB, 512MiB, 2000000000)") from None
    if n <= 0:
        raise MoepruneError(f"{what} must be positive, got {value!r}")
    return n


def parse_devices(device) -> list[torch.device]:
    """One device, or several for data parallelism ('cuda:0,cuda:1', a list). 'cpu' may repeat (CPU
    threads; for testing the parallel path), a GPU may not."""
    if isinstance(device, str) and "," in device:
        items: list = [d.strip() for d in device.split(",") if d.strip()]
    elif isinstance(device, (list, tuple)):
        items = list(device)
    else:
        items = [device]
    try:
        devices = [torch.device(d) for d in items]
    except (RuntimeError, TypeError):
        raise MoepruneError(f"{device!r} is not a device or a list of devices (e.g. cuda:0,cuda:1)") from None
    if not devices:
        raise MoepruneError("no device given")
    gpus = [d for d in devices if d.type != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise MoepruneError(f"a device is listed twice in {device!r}")
    return devices


def one_device(device) -> torch.device:
    """`device`, which must name one device: several run the streamed path only."""
    devices = parse_devices(device)
    if len(devices) > 1:
        raise MoepruneError(f"several devices ({device}) split batches in the layer-streamed run only; drop "
                            f"stream=False (--no-stream) or give one device")
    return devices[0]


def module_bytes(module: nn.Module) -> int:
    """Bytes a module's parameters and buffers take (each tensor once; meta tensors count their size)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def plan_memory(budget: int | None, largest_layer: int, cache_bytes: int) -> tuple[bool, bool]:
    """(read the next layer while one computes, spill the hidden-state cache) under `budget`, which
    the layers in flight and the cache share."""
    if budget is None:
        return True, False
    prefetch = 2 * largest_layer <= budget
    room = budget - (2 if prefetch else 1) * largest_layer
    return prefetch, cache_bytes > room


def _human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


class _Stop(Exception):
    """Raised by the last catching stub: nothing after the decoder layers runs while catching."""


class _Catch(nn.Module):
    """Stands in for decoder layer `index` while catching: records its keyword arguments per batch
    (and layer 0's hidden states), returns its input unchanged."""

    def __init__(self, index: int, last: bool, sink: Callable[[int, torch.Tensor, dict], None]):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise MoepruneError("internal: a decoder layer got positional arguments besides the hidden states; "
                                "this model family cannot be streamed")
        self.sink(self.index, hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


class _Replay(nn.Module):
    """Stands in for decoder layer 0 while the head runs: returns the final hidden states of a batch."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


class _Pass(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def _swapped(layers: nn.ModuleList, stubs: Sequence[nn.Module]) -> Iterator[None]:
    originals = list(layers)
    try:
        for i, stub in enumerate(stubs):
            layers[i] = stub
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


class HiddenCache:
    """The hidden states of every batch between two layers: in memory, or spilled to a file (read
    and written with pread/pwrite, so they never count as the process's memory)."""

    def __init__(self, spill_dir: str | None = None):
        self._mem: dict[int, torch.Tensor] = {}
        self._spill = spill_dir is not None
        self._slots: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._fd: int | None = None
        self._end = 0
        if self._spill:
            fd, path = tempfile.mkstemp(prefix="moeprune-hidden-", suffix=".bin", dir=spill_dir)
            os.unlink(path)  # gone from the folder at once; the space is freed when the file is closed
            self._fd = fd

    @property
    def spilled(self) -> bool:
        return self._spill

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        if not self._spill:
            self._mem[batch] = hidden
            return
        data = hidden.detach().to("cpu").contiguous()
        raw = data.view(-1).view(torch.uint8).numpy()
        slot = self._slots.get(batch)
        if slot is None:  # a batch keeps its place: every layer's output has the input's shape
            slot = (self._end, tuple(data.shape), data.dtype)
            self._end += raw.nbytes
            self._slots[batch] = slot
        elif slot[1:] != (tuple(data.shape), data.dtype):
            raise MoepruneError(f"internal: batch {batch} changed shape in the hidden-state cache")
        offset, view = slot[0], memoryview(raw)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def get(self, batch: int) -> torch.Tensor:
        if not self._spill:
            return self._mem[batch]
        offset, shape, dtype = self._slots[batch]
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        while view:
            n = os.preadv(self._fd, [view], offset)
            if n <= 0:
                raise MoepruneError("the hidden-state spill file was truncated while in use")
            view, offset = view[n:], offset + n
        return out

    def close(self) -> None:
        self._mem.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class StreamReport:
    """What a streamed run did: bytes read, the largest layer, whether the cache spilled."""

    bytes_read: int = 0
    largest_layer: int = 0  # bytes, in the compute dtype
    cache_bytes: int = 0
    spilled: bool = False
    prefetch: bool = True


class LayerStream:
    """A checkpoint opened to run one decoder layer at a time (see the module docstring).

    `pattern`: hold only its experts (as `load_slim` would), else every expert. `memory_budget`
    (bytes or '8GB'): the layers in flight plus the hidden-state cache must fit; the cache spills
    to a file in `spill_dir` when they would not, and a budget below one layer is refused.
    """

    def __init__(self, model_path, dtype=None, device: str | torch.device = "cpu", pattern: Pattern | None = None,
                 memory_budget: int | str | None = None, spill_dir: str | None = None, threads: int = 4,
                 record_reads: bool = False):
        bound_kernel_caches()
        map_large_blocks()
        self.ckpt = Checkpoint(model_path, record_reads=record_reads)
        try:
            self._open(dtype, device, pattern, parse_bytes(memory_budget), spill_dir, threads)
        except BaseException:
            self.ckpt.close()
            raise

    def _open(self, dtype, device, pattern, budget, spill_dir, threads) -> None:
        ckpt = self.ckpt
        self.adapter, self.config, self.folder = ckpt.adapter, ckpt.config, ckpt.folder
        self.devices = parse_devices(device)
        self.device = self.devices[0]
        self.dtype = ckpt.dtype(dtype)
        self.threads = threads
        self.budget, self.spill_dir = budget, spill_dir
        routers = ckpt.read_routers()
        self.fingerprint = ckpt.fingerprint(routers)
        if pattern is not None:
            ckpt.check_pattern(pattern, self.fingerprint)
            kept = {layer: list(ids) for layer, ids in pattern.kept.items()}
        else:
            kept = {layer: list(range(ckpt.num_experts)) for layer in ckpt.layers}
        self.kept = kept
        self.model, self._routers = ckpt.slim_skeleton(kept, self.dtype, routers)
        self.model.eval()
        self.model.config._name_or_path = str(self.folder)
        # data parallel: one meta skeleton per device, each running its share of the batches
        self.models = [self.model] + [copy.deepcopy(self.model) for _ in self.devices[1:]]
        self.layers = self.adapter.decoder_layers(self.model)
        fused = {n for layer in kept for n in self.adapter.fused_keys(layer)}
        plan, used = ckpt.backbone_plan(self.model, fused | set(self._routers))
        ckpt.check_keys(used)  # every key accounted for before the first byte of a layer is read
        prefix = {id(layer): f"{name}." for name, layer in self.model.named_modules() if name and layer in self.layers}
        self._layer_plan: list[list[Read]] = [[] for _ in self.layers]
        self._outer_plan: list[Read] = []
        starts = [prefix[id(layer)] for layer in self.layers]
        for r in plan:
            i = next((i for i, s in enumerate(starts) if r.name.startswith(s)), None)
            (self._outer_plan if i is None else self._layer_plan[i]).append(r)
        self._starts = starts
        self.report = StreamReport(largest_layer=max(self.layer_bytes(i) for i in range(len(self.layers))))
        if budget is not None and self.report.largest_layer > budget:
            i = max(range(len(self.layers)), key=self.layer_bytes)
            raise MoepruneError(f"memory budget {_human(budget)} is smaller than one decoder layer "
                                f"(layer {i}: {_human(self.layer_bytes(i))} in {str(self.dtype).removeprefix('torch.')}); "
                                f"give at least {_human(2 * self.report.largest_layer)} (two layers, to read "
                                f"the next while one computes)")

    # ------------------------------------------------------------------ sizes
    def layer_bytes(self, i: int) -> int:
        """Bytes decoder layer i takes in memory (compute dtype; what the skeleton holds)."""
        return module_bytes(self.layers[i])

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reads
    def _stage(self, plan: list[Read], layer: int | None) -> dict[str, torch.Tensor]:
        """Read (and decode) the tensors of one stage into host buffers."""
        buffers, jobs = self.ckpt.plan_reads(plan)
        if layer is not None and layer in self.kept:
            staged, expert_jobs = self.ckpt.expert_reads(layer, self.kept[layer], self.dtype)
            buffers.update(staged)
            jobs = expert_jobs + jobs
            for name in self.adapter.router_keys(layer):
                if name in self._routers:
                    buffers[name] = self._routers[name]
        run_reads(jobs, self.threads)
        if self.device.type == "cuda":
            buffers = {k: v.pin_memory() for k, v in buffers.items()}
        return buffers

    def _install(self, buffers: dict[str, torch.Tensor]) -> None:
        """Fill every device's skeleton from one set of host buffers (emptied as it goes)."""
        for k in range(len(self.models) - 1, -1, -1):  # device 0 last: it takes the host buffers themselves
            mine = buffers if k == 0 else dict(buffers)
            for name, value in mine.items():
                mine[name] = value.to(self.devices[k], non_blocking=True)
            Checkpoint.fill(self.models[k], mine)

    def device_index(self, batch: int) -> int:
        """Which device runs batch `batch` (round robin)."""
        return batch % len(self.devices)

    def device_of(self, batch: int) -> torch.device:
        return self.devices[self.device_index(batch)]

    def share(self, n_batches: int) -> list[list[int]]:
        """The batches each device runs, in order."""
        out: list[list[int]] = [[] for _ in self.devices]
        for b in range(n_batches):
            out[self.device_index(b)].append(b)
        return out

    def _free(self, module: nn.Module) -> None:
        module.to("meta")
        release_freed_memory()

    def _outer(self, keep: Callable[[str], bool]) -> list[Read]:
        return [r for r in self._outer_plan if keep(r.name)]

    # ------------------------------------------------------------------ run
    def run(self, batches: Sequence[dict[str, torch.Tensor]], before: Callable[[int, int], None] | None = None,
            head: Callable[[int, torch.Tensor], None] | None = None, progress: bool = False) -> StreamReport:
        """Run `batches` (dicts of model inputs: input_ids, attention_mask) through the model layer by
        layer. `before(layer, batch)` is called before each layer forward (set per-batch state for
        hooks); with `head`, `head(batch, logits)` gets each batch's output logits at the end. With
        several devices each runs its `share` of the batches on its own skeleton, one thread per
        device: `before` for a batch is called on the thread of `device_of(batch)`; `head` on this one."""
        model, n_layers = self.model, len(self.layers)
        tied = bool(tied_names(model))  # the output head is the embedding: keep it to the end
        out_emb = model.get_output_embeddings()
        head_names = {f"{name}.{p}" for name, m in model.named_modules() if m is out_emb
                      for p, _ in m.named_parameters()}
        kwargs: list[list[dict]] = [[None] * len(batches) for _ in range(n_layers)]
        cache_bytes = sum(b["input_ids"].numel() for b in batches) * model.config.get_text_config().hidden_size \
            * torch.empty((), dtype=self.dtype).element_size()
        prefetch, spill = self._plan_memory(cache_bytes)
        cache = HiddenCache(self.spill_dir or tempfile.gettempdir()) if spill else HiddenCache()
        self.report.cache_bytes, self.report.spilled, self.report.prefetch = cache_bytes, spill, prefetch
        shares = self.share(len(batches))
        layers = [self.adapter.decoder_layers(m) for m in self.models]
        try:
            # 1. catch: everything outside the decoder layers but the output head, then the stubs
            self._install(self._stage(self._outer(lambda n: n not in head_names), None))
            for k, m in enumerate(self.models):
                self._catch(m, layers[k], [(b, batches[b]) for b in shares[k]], self.devices[k], kwargs, cache)
                if not tied:
                    self._free(m.get_input_embeddings())
            # 2. the decoder layers, the next one read while this one runs
            with ThreadPoolExecutor(max_workers=1) as reader, \
                    ThreadPoolExecutor(max_workers=max(1, len(self.models) - 1)) as workers:
                pending: Future | None = reader.submit(self._stage, self._layer_plan[0], 0)
                for i in tqdm(range(n_layers), desc="layers", unit="layer", disable=not progress):
                    buffers = pending.result()
                    pending = None
                    self._install(buffers)
                    del buffers
                    if prefetch and i + 1 < n_layers:
                        pending = reader.submit(self._stage, self._layer_plan[i + 1], i + 1)

                    def work(k: int, i: int = i) -> None:
                        layer, device = layers[k][i], self.devices[k]
                        # code that allocates on "the current device" must find this thread's GPU
                        on_gpu = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
                        with torch.no_grad(), on_gpu:
                            for b in shares[k]:
                                if before is not None:
                                    before(i, b)
                                cache.put(b, layer(cache.get(b).to(device), **kwargs[i][b]))
                                kwargs[i][b] = None

                    others = [workers.submit(work, k) for k in range(1, len(self.models))]
                    work(0)
                    for f in others:
                        f.result()
                    for k in range(len(self.models)):
                        self._free(layers[k][i])
                    if not prefetch and i + 1 < n_layers:
                        pending = reader.submit(self._stage, self._layer_plan[i + 1], i + 1)
            # 3. the head, on the last hidden states
            if head is not None:
                self._install(self._stage(self._outer(lambda n: n in head_names), None))
                for k, m in enumerate(self.models):
                    self._head(m, layers[k], [(b, batches[b]) for b in shares[k]], self.devices[k], cache, head)
        finally:
            cache.close()
            for m in self.models:
                self._free(m)
        self.report.bytes_read = self.ckpt.reader.bytes_read
        return self.report

    @staticmethod
    def _catch(model: nn.Module, layers: nn.ModuleList, batches: list[tuple[int, dict]], device: torch.device,
               kwargs: list[list[dict]], cache: HiddenCache) -> None:
        """Run the embedding of each (index, batch) into stubs that keep each decoder layer's keyword
        arguments and the hidden states entering layer 0."""
        current = 0

        def sink(index: int, hidden: torch.Tensor, kw: dict) -> None:
            kwargs[index][current] = kw
            if index == 0:
                cache.put(current, hidden)

        stubs = [_Catch(i, i == len(layers) - 1, sink) for i in range(len(layers))]
        with _swapped(layers, stubs), torch.no_grad():
            for current, batch in batches:  # noqa: B007 - read by sink
                with contextlib.suppress(_Stop):
                    model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)

    @staticmethod
    def _head(model: nn.Module, layers: nn.ModuleList, batches: list[tuple[int, dict]], device: torch.device,
              cache: HiddenCache, head: Callable[[int, torch.Tensor], None]) -> None:
        """The model's own final norm and output head on each batch's last hidden states."""
        model.tie_weights()
        replay = _Replay()
        with _swapped(layers, [replay] + [_Pass() for _ in range(len(layers) - 1)]), torch.no_grad():
            for b, batch in batches:
                replay.hidden = cache.get(b).to(device)
                zeros = torch.zeros_like(replay.hidden)
                out = model(inputs_embeds=zeros, attention_mask=batch["attention_mask"].to(device), use_cache=False)
                head(b, out.logits)

    def _plan_memory(self, cache_bytes: int) -> tuple[bool, bool]:
        """(read the next layer while one computes, spill the hidden-state cache) under the budget."""
        return plan_memory(self.budget, self.report.largest_layer, cache_bytes)
