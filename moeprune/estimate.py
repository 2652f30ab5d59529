"""`estimate(path)`: what profiling, a slim model and its export will need, from the headers alone.

Nothing but config.json and the safetensors headers is read: the sizes come from a meta-device
skeleton of the model, built as `LayerStream` and `load_slim` build theirs
(`Checkpoint.slim_skeleton`), in the compute dtype. With a pattern the routers are read too (they
are small and give the fingerprint that a pattern for another model is refused by, as `load_slim`
refuses it); the export's size comes from the export's own plan (`exporter.export_plan`), so kept
experts count with their quantization companions, byte for byte as `export` copies them.

Peak memory is an estimate, not a measurement: a process floor (`FLOOR_BYTES`, for Python, torch
and transformers) plus what the weights and the activations take.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .errors import MoepruneError
from .models import check_int, check_model_path, resolve_length
from .pattern import Pattern, as_pattern
from .stream import module_bytes, parse_bytes, plan_memory

FLOOR_BYTES = 2**29  # 0.5 GiB: Python, torch, transformers and the tokenizer, before any weight (an assumption)
DEFAULT_PROMPTS = 64
DEFAULT_TOKENS = 512  # profile's default max_length (capped at the model's context)


@dataclass
class Estimate:
    """Sizes in bytes. `layer_bytes[i]`: decoder layer i in the compute dtype (what `LayerStream`
    holds per layer); `model_bytes`: the whole model so; `head_bytes`: input embedding and output
    head (once when tied). The pattern fields are None without a pattern; `export_bytes` is also
    None for a pattern `export` refuses (non-uniform), with the reason in `export_note`."""

    folder: str
    model_type: str
    codec: str
    disk_bytes: int
    n_files: int
    dtype: torch.dtype
    n_layers: int
    moe_layers: list[int]
    num_experts: int
    layer_bytes: list[int]
    head_bytes: int
    model_bytes: int
    prompts: int
    tokens: int
    hidden: int
    activation_bytes: int
    floor_bytes: int = FLOOR_BYTES
    budget: int | None = None
    kept: dict[int, int] | None = None
    slim_bytes: int | None = None
    export_bytes: int | None = None
    export_note: str = ""
    tensor_bytes_read: int = 0  # tensor data read to estimate (the routers, with a pattern)

    @property
    def largest_layer(self) -> int:
        return max(self.layer_bytes)

    @property
    def streamed_peak(self) -> int:
        """Streamed profiling: two decoder layers (one computes, the next is read), the embedding and
        head, the activations, the process floor."""
        return 2 * self.largest_layer + self.head_bytes + self.activation_bytes + self.floor_bytes

    @property
    def in_memory_peak(self) -> int:
        """In-memory profiling (`--no-stream`): the whole model, the activations, the process floor."""
        return self.model_bytes + self.activation_bytes + self.floor_bytes

    def budget_plan(self) -> dict | None:
        """Under `budget` (which, as `profile --memory-budget`, the layers in flight and the
        activations share): whether streaming can run (one layer must fit), reads ahead, spills the
        activations, and whether the whole model with its activations fits."""
        if self.budget is None:
            return None
        largest = self.largest_layer
        streams = largest <= self.budget
        prefetch, spill = plan_memory(self.budget, largest, self.activation_bytes) if streams else (False, False)
        in_flight = (2 if prefetch else 1) * largest
        peak = in_flight + (0 if spill else self.activation_bytes) + self.head_bytes + self.floor_bytes
        return {"streams": streams, "prefetch": prefetch, "spill": spill, "streamed_peak": peak if streams else None,
                "in_memory_fits": self.model_bytes + self.activation_bytes <= self.budget}


def estimate(model_path: str | os.PathLike, pattern: Pattern | str | os.PathLike | None = None,
             prompts: int = DEFAULT_PROMPTS, tokens: int | None = None, dtype=None,
             memory_budget: int | str | None = None) -> Estimate:
    """What profiling `model_path` (`prompts` x `tokens`, in `dtype`: default the checkpoint's) and,
    with `pattern`, its slim model and export will need; reads no tensor but the routers (and
    those only with a pattern). A local folder (or a cached hub id) only: nothing is downloaded."""
    check_int(prompts, "prompts", minimum=1)
    budget = parse_bytes(memory_budget)
    path = check_model_path(model_path)
    if not os.path.isdir(path):
        raise MoepruneError(f"estimate needs a local checkpoint folder (or a hub id already in the cache), "
                            f"got {model_path}")
    pattern = as_pattern(pattern) if pattern is not None else None
    with Checkpoint(path) as ckpt:
        reader, config = ckpt.reader, ckpt.config
        compute = ckpt.dtype(dtype)
        tokens = resolve_length(tokens, DEFAULT_TOKENS, config, "tokens")
        files = {reader.file_of(k) for k in reader.keys()}  # noqa: SIM118 - the reader has no __iter__
        every = {layer: list(range(ckpt.num_experts)) for layer in ckpt.layers}
        model, _ = ckpt.slim_skeleton(every, compute, {})  # no routers needed for sizes: none read
        model.tie_weights()  # as a loaded model: a tied head is the embedding, counted once
        layers = ckpt.adapter.decoder_layers(model)
        ends = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        heads = {id(p): p for m in ends for p in m.parameters()}  # a tied head is the embedding: once
        hidden = config.get_text_config().hidden_size
        est = Estimate(
            folder=str(ckpt.folder), model_type=config.model_type, codec=ckpt.codec.describe(),
            disk_bytes=sum(f.stat().st_size for f in files), n_files=len(files), dtype=compute,
            n_layers=len(layers), moe_layers=list(ckpt.layers), num_experts=ckpt.num_experts,
            layer_bytes=[module_bytes(layer) for layer in layers],
            head_bytes=sum(p.numel() * p.element_size() for p in heads.values()),
            model_bytes=module_bytes(model), prompts=prompts, tokens=tokens, hidden=hidden,
            activation_bytes=prompts * tokens * hidden * compute.itemsize, budget=budget,
        )
        del model
        if pattern is not None:
            _pattern_sizes(ckpt, pattern, compute, est)
        est.tensor_bytes_read = reader.bytes_read
    return est


def _pattern_sizes(ckpt: Checkpoint, pattern: Pattern, compute: torch.dtype, est: Estimate) -> None:
    """The slim model's size (as `load_slim` builds it) and the export's tensor bytes (as `export` plans them)."""
    from .exporter import export_plan

    routers = ckpt.read_routers()
    ckpt.check_pattern(pattern, ckpt.fingerprint(routers))
    slim, _ = ckpt.slim_skeleton(pattern.kept, compute, routers)
    slim.tie_weights()
    est.kept, est.slim_bytes = dict(pattern.counts), module_bytes(slim)
    del slim
    if not pattern.is_uniform:
        est.export_note = "a non-uniform pattern cannot be exported (vanilla transformers holds one expert count)"
        return
    for layer, ids in pattern.kept.items():  # as export: every kept expert complete, from the headers
        ckpt.check_experts(layer, ids)
    est.export_bytes = sum(item.nbytes for item in export_plan(ckpt, pattern, routers))
    if ckpt.adapter.extra_layers(ckpt.config):
        est.export_note = "multi-token-prediction layers dropped (export's default --mtp drop)"


def size(n: int) -> str:
    """Bytes for people: GiB, MiB or KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale / 10:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_estimate(est: Estimate, pattern_name: str | None = None) -> str:
    """The estimate as the CLI prints it."""
    dt = str(est.dtype).removeprefix("torch.")
    layers = est.layer_bytes
    lines = [
        f"checkpoint   {est.folder} ({est.model_type})",
        f"  on disk    {size(est.disk_bytes)} in {est.n_files} file{'s' if est.n_files != 1 else ''}, {est.codec}",
        f"  layers     {est.n_layers} decoder layers, {len(est.moe_layers)} MoE layers x {est.num_experts} experts",
        f"weights in {dt} (compute dtype)",
        f"  per layer  min {size(min(layers))}, median {size(int(statistics.median(layers)))}, "
        f"max {size(max(layers))}",
        f"  embedding + head  {size(est.head_bytes)}",
        f"  whole model       {size(est.model_bytes)}",
        f"activations  {est.prompts} prompts x {est.tokens} tokens x hidden {est.hidden} x {est.dtype.itemsize} bytes "
        f"= {size(est.activation_bytes)}",
        f"peak memory (estimate; assumes a {size(est.floor_bytes)} process floor)",
        f"  streamed profiling   {size(est.streamed_peak)}  (2 x largest layer + embedding + head + activations "
        f"+ floor)",
        f"  in-memory profiling  {size(est.in_memory_peak)}  (--no-stream: whole model + activations + floor)",
    ]
    plan = est.budget_plan()
    if plan is not None:
        lines.append(f"memory budget {size(est.budget)} (layers in flight + activations, as profile --memory-budget)")
        if not plan["streams"]:
            lines.append(f"  streamed   does not fit: one decoder layer is {size(est.largest_layer)}; "
                         f"give at least {size(2 * est.largest_layer)}")
        else:
            how = "reads the next layer ahead" if plan["prefetch"] else "one layer at a time (no read-ahead)"
            acts = "activations spill to a temporary file" if plan["spill"] else "activations stay in memory"
            lines.append(f"  streamed   fits: {how}, {acts}; peak about {size(plan['streamed_peak'])}")
        need = est.model_bytes + est.activation_bytes
        lines.append(f"  in-memory  {'fits' if plan['in_memory_fits'] else 'does not fit'} "
                     f"(model + activations {size(need)})")
    if est.kept is not None:
        counts = sorted(set(est.kept.values()))
        kept = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        lines.append(f"pattern{' ' + pattern_name if pattern_name else ''}: {kept} of {est.num_experts} experts "
                     f"per layer kept")
        lines.append(f"  slim model (load_slim)  {size(est.slim_bytes)} in {dt} "
                     f"({est.slim_bytes / est.model_bytes:.0%} of the whole model)")
        if est.export_bytes is not None:
            lines.append(f"  export on disk          {size(est.export_bytes)} of tensors, as stored ({est.codec}), "
                         f"plus headers{'; ' + est.export_note if est.export_note else ''}")
        else:
            lines.append(f"  export                  {est.export_note}")
    read = "routers only" if est.kept is not None else "none"
    lines.append(f"tensor data read: {size(est.tensor_bytes_read)} ({read})")
    return "\n".join(lines)
