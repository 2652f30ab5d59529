"""`load_slim(path, pattern)`: a transformers model that holds only a pattern's experts, built
straight from the checkpoint's safetensors without ever materialising the full model.

The skeleton is built on the meta device (accelerate's `init_empty_weights`: parameters cost no
memory, buffers such as rotary tables are computed normally). Every parameter is then read
through `CheckpointReader`: non-expert tensors whole, kept experts by their byte ranges
(per-expert hub keys, or rows of fused tensors), routers whole (they are small and also give the
fingerprint) and sliced to the kept rows. Nothing of a pruned expert's weights is read.
Quantized checkpoints (block FP8) are decoded by the checkpoint's codec into the requested dtype;
a scheme moeprune does not implement is refused before any tensor is read. The assembly itself
(skeleton, reads, decoding, checks, tying) lives in `moeprune.checkpoint`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .checkpoint import (  # noqa: F401 - re-exported: older callers import these from here
    Checkpoint,
    check_pattern,
    checkpoint_fingerprint,
    model_folder,
    read_routers,
    run_reads,
)
from .pattern import Pattern, as_pattern


@dataclass
class LoadReport:
    """What `load_slim` read: for tests and benchmarks. `reads` lists (file, offset, bytes) of every
    read only when `load_slim(..., record_reads=True)` asked for it; it is empty otherwise."""

    bytes_read: int = 0
    tensors_read: int = 0  # preads of tensor data (a run of consecutive expert rows is one)
    reads: list = field(default_factory=list)


def load_slim(
    model_path: str | os.PathLike,
    pattern: Pattern | str | os.PathLike,
    dtype=None,
    device: str | torch.device = "cpu",
    verify: bool = True,
    threads: int = 4,
    record_reads: bool = False,
):
    """A model with only `pattern`'s experts (renumbered 0..k-1), loaded from `model_path`'s safetensors.

    Uniform patterns give the stock transformers class with the expert count set to k; non-uniform
    ones give the same class with each MoE layer sized to its own count. With `verify`, a pattern
    made for another model (fingerprint mismatch) is refused. Quantized weights (block FP8) are
    decoded into `dtype` (default: the dtype the config declares, bf16 for the hub's FP8 releases)
    and the model's config carries no `quantization_config`. `model.moeprune_load_report` says what
    was read; with `record_reads` it lists every read (`report.reads`).
    """
    pattern = as_pattern(pattern)
    with Checkpoint(model_path, record_reads=record_reads) as ckpt:
        routers = ckpt.read_routers()
        fp = ckpt.fingerprint(routers) if verify else None
        ckpt.check_pattern(pattern, fp)
        model = ckpt.load_experts(pattern.kept, ckpt.dtype(dtype), routers, threads)
        r = ckpt.reader
        report = LoadReport(r.bytes_read, r.n_reads, list(r.reads))
    model.eval().to(device)
    model.config._name_or_path = str(ckpt.folder)
    model.moeprune_pattern = pattern
    model.moeprune_source_fingerprint = fp  # a slim model's own routers are sliced: keep the source's identity
    model.moeprune_load_report = report
    return model


def load_full(model_path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu", threads: int = 4):
    """The whole model (every expert) assembled by moeprune rather than by transformers: quantized
    weights are decoded by moeprune's codec, so profiling a quantized checkpoint does not depend on
    transformers' dequantization (which cannot decode DeepSeek-V3's 576-row kv_a_proj_with_mqa)."""
    with Checkpoint(model_path) as ckpt:
        routers = ckpt.read_routers()
        kept = {layer: list(range(ckpt.num_experts)) for layer in ckpt.layers}
        model = ckpt.load_experts(kept, ckpt.dtype(dtype), routers, threads)
    model.eval().to(device)
    model.config._name_or_path = str(ckpt.folder)
    return model
