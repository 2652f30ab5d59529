"""`load_slim(path, pattern)`: a transformers model that holds only a pattern's experts, built
straight from the checkpoint's safetensors without ever materialising the full model.

The skeleton is built on the meta device (accelerate's `init_empty_weights`: parameters cost no
memory, buffers such as rotary tables are computed normally). Every parameter is then read
through `CheckpointReader`: non-expert tensors whole, kept experts by their byte ranges
(per-expert hub keys, or rows of fused tensors), routers whole (they are small and also give the
fingerprint) and sliced to the kept rows. Nothing of a pruned expert's weights is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MoepruneError
from .fingerprint import fingerprint_from_parts
from .models import check_model_path, load_config, parse_dtype
from .pattern import Pattern, as_pattern
from .reader import CheckpointReader
from .routers import get_adapter
from .routers.base import MoEAdapter


@dataclass
class LoadReport:
    """What `load_slim` read: for tests and benchmarks. `reads` lists (file, offset, bytes) of every
    read only when `load_slim(..., record_reads=True)` asked for it; it is empty otherwise."""

    bytes_read: int = 0
    tensors_read: int = 0  # preads of tensor data (a run of consecutive expert rows is one)
    reads: list = field(default_factory=list)


def checkpoint_name(reader: CheckpointReader, name: str, adapter: MoEAdapter) -> str | None:
    """The checkpoint key holding in-memory tensor `name` (hub names may differ: block_sparse_moe, gate)."""
    candidates = [
        name,
        name.replace(f".{adapter.block_attr}.{adapter.router_attr}.", f".{adapter.ckpt_block}.{adapter.ckpt_router}."),
        name.replace(f".{adapter.block_attr}.", f".{adapter.ckpt_block}."),
    ]
    for c in candidates:
        if c in reader:
            return c
    return None


def read_routers(reader: CheckpointReader, adapter: MoEAdapter, layers: list[int]) -> dict[str, torch.Tensor]:
    """Full router tensors (weight, bias, correction bias) of every MoE layer, by in-memory name."""
    out = {}
    for layer in layers:
        for name in adapter.router_keys(layer):
            key = checkpoint_name(reader, name, adapter)
            if key is None:
                if name.endswith(".weight"):
                    raise MoepruneError(f"checkpoint {reader.folder} lacks the router weight of layer {layer} ({name})")
                continue
            out[name] = reader.get(key)
    return out


def checkpoint_fingerprint(config, routers: dict[str, torch.Tensor], adapter: MoEAdapter, layers) -> str:
    weights = [routers[adapter.router_keys(layer)[0]] for layer in layers]
    return fingerprint_from_parts(config, weights)


def check_pattern(pattern: Pattern, config, adapter: MoEAdapter, fingerprint: str | None) -> None:
    """Refuse a pattern made for another model or one the router cannot realise."""
    if fingerprint is not None and not pattern.fingerprint:
        raise MoepruneError("the pattern does not name the model it was made for (no fingerprint), so it cannot "
                            "be checked against this checkpoint; select it again from a profile of this model")
    if fingerprint is not None and pattern.fingerprint != fingerprint:
        raise MoepruneError(
            f"the pattern was made for another model (fingerprint {pattern.fingerprint}, this checkpoint "
            f"is {fingerprint}); profile this model and select again"
        )
    layers = adapter.moe_layers(config)
    if sorted(pattern.kept) != layers:
        raise MoepruneError(f"the pattern covers MoE layers {sorted(pattern.kept)}, the model has {layers}")
    if pattern.meta.get("num_experts") not in (None, adapter.num_experts(config)):
        raise MoepruneError(f"the pattern is for {pattern.meta['num_experts']} experts per layer, "
                            f"the model has {adapter.num_experts(config)}")
    for layer, ids in pattern.kept.items():
        try:
            adapter.check_keep(config, ids)
        except MoepruneError as e:
            raise MoepruneError(f"layer {layer}: {e}") from None


Job = Callable[[], object]


def expert_reads(reader: CheckpointReader, adapter: MoEAdapter, layer: int,
                 kept: list[int]) -> tuple[dict[str, torch.Tensor], list[Job]]:
    """Buffers for the fused tensors of a layer's kept experts (kept order), and the reads that fill them."""
    fused_names = adapter.fused_keys(layer)
    fused_keys = [checkpoint_name(reader, n, adapter) for n in fused_names]
    out: dict[str, torch.Tensor] = {}
    jobs: list[Job] = []
    if all(k is not None for k in fused_keys):
        for name, key in zip(fused_names, fused_keys, strict=True):
            buf = torch.empty((len(kept), *reader.shape(key)[1:]), dtype=reader.dtype(key))
            out[name] = buf
            jobs.append(lambda key=key, buf=buf: reader.get_rows(key, kept, out=buf))
        return out, jobs
    if adapter.ckpt_expert_projs is None:
        raise MoepruneError(f"checkpoint {reader.folder} lacks the experts of layer {layer} ({fused_names[0]})")
    for e in kept:
        missing = [k for k in adapter.ckpt_expert_keys(layer, e) if k not in reader]
        if missing:
            raise MoepruneError(f"checkpoint {reader.folder} lacks {missing[0]}")
    g0, u0, d0 = adapter.ckpt_expert_keys(layer, kept[0])
    n_gate = reader.shape(g0)[0]
    gate_up = torch.empty((len(kept), n_gate + reader.shape(u0)[0], *reader.shape(g0)[1:]), dtype=reader.dtype(g0))
    down = torch.empty((len(kept), *reader.shape(d0)), dtype=reader.dtype(d0))
    for j, e in enumerate(kept):
        g, u, d = adapter.ckpt_expert_keys(layer, e)
        # gate and up land in their halves of the fused row: no concatenation copies
        jobs += [lambda g=g, j=j: reader.get(g, out=gate_up[j, :n_gate]),
                 lambda u=u, j=j: reader.get(u, out=gate_up[j, n_gate:]),
                 lambda d=d, j=j: reader.get(d, out=down[j])]
    out[fused_names[0]], out[fused_names[1]] = gate_up, down
    return out, jobs


def backbone_reads(model: nn.Module, reader: CheckpointReader, adapter: MoEAdapter,
                   skip: set[str]) -> tuple[dict[str, torch.Tensor], list[Job]]:
    """Buffers for every tensor of `model` not in `skip` (nor tied), and the reads that fill them."""
    buffers: dict[str, torch.Tensor] = {}
    jobs: list[Job] = []
    tied = _tied_names(model)
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name in skip or name in tied:
            continue
        key = checkpoint_name(reader, name, adapter)
        if key is None:
            if _is_meta(model, name):
                raise MoepruneError(f"checkpoint {reader.folder} lacks tensor {name}")
            continue  # a buffer computed at construction (rotary tables) and not stored
        buf = torch.empty(reader.shape(key), dtype=reader.dtype(key))
        buffers[name] = buf
        jobs.append(lambda key=key, buf=buf: reader.get(key, out=buf))
    return buffers, jobs


def model_folder(model_path: str | os.PathLike) -> str:
    """A local checkpoint folder for a folder path or a hub id (downloaded where the hub is reachable)."""
    path = check_model_path(model_path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise MoepruneError(f"model folder not found and hub download failed for {model_path}: {e}") from None


def run_reads(jobs: list[Job], threads: int) -> None:
    """Run reads on a few threads: pread releases the GIL, so one core's worth of copying overlaps I/O."""
    if threads <= 1 or len(jobs) < 2:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(lambda job: job(), jobs):
            pass


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise MoepruneError(f"internal: {name} is neither a parameter nor a buffer")


def _resize_layer(adapter: MoEAdapter, block: nn.Module, count: int, top_k: int) -> None:
    """Make a MoE block's modules agree with `count` experts (their forwards read these attributes)."""
    for module in (block, adapter.router(block), adapter.experts(block)):
        if hasattr(module, "num_experts"):
            module.num_experts = count
        if hasattr(module, "top_k"):
            module.top_k = min(module.top_k, count, top_k) if isinstance(module.top_k, int) else module.top_k


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
    made for another model (fingerprint mismatch) is refused. `model.moeprune_load_report` says what
    was read; with `record_reads` it lists every read (`report.reads`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    pattern = as_pattern(pattern)
    path = model_folder(model_path)
    config = load_config(path)
    adapter = get_adapter(config)
    layers = adapter.moe_layers(config)
    report = LoadReport()
    with CheckpointReader(path, record=record_reads) as reader:
        routers = read_routers(reader, adapter, layers)
        fp = checkpoint_fingerprint(config, routers, adapter, layers) if verify else None
        check_pattern(pattern, config, adapter, fp)

        counts = pattern.counts
        top_k = adapter.top_k(config)
        slim_config = adapter.sliced_config(config, max(counts.values()))
        if not pattern.is_uniform:
            slim_config.moeprune_experts_per_layer = {str(k): v for k, v in counts.items()}
        target = parse_dtype(dtype) or _checkpoint_dtype(config, reader)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(slim_config, dtype=target)
        for layer, block in adapter.blocks(model):
            _resize_layer(adapter, block, counts[layer], top_k)

        buffers: dict[str, torch.Tensor] = {}
        jobs: list[Job] = []
        for layer in layers:
            out, layer_jobs = expert_reads(reader, adapter, layer, pattern.kept[layer])
            buffers.update(out)
            jobs += layer_jobs
        backbone, backbone_jobs = backbone_reads(model, reader, adapter, set(buffers) | set(routers))
        buffers.update(backbone)
        jobs += backbone_jobs
        run_reads(jobs, threads)
        for layer in layers:
            index = torch.as_tensor(pattern.kept[layer], dtype=torch.long)
            for name, tensor in routers.items():
                if name.startswith(f"model.layers.{layer}."):
                    buffers[name] = tensor.index_select(0, index).contiguous()
        for name in list(buffers):
            _set_tensor(model, name, _cast(buffers.pop(name), model, name))
        report.bytes_read, report.tensors_read, report.reads = reader.bytes_read, reader.n_reads, list(reader.reads)

    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise MoepruneError(f"checkpoint {path} lacks tensors: {', '.join(left[:5])}")
    model.eval().to(device)
    model.config._name_or_path = str(path)
    model.moeprune_pattern = pattern
    model.moeprune_source_fingerprint = fp  # a slim model's own routers are sliced: keep the source's identity
    model.moeprune_load_report = report
    return model


def _checkpoint_dtype(config, reader: CheckpointReader) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and d != "auto":
        return parse_dtype(d)
    for key in reader.keys():  # noqa: SIM118 - the reader has no __iter__
        if reader.dtype(key).is_floating_point:
            return reader.dtype(key)
    return torch.float32


def _tied_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    return {n for n, p in model.named_parameters() if out is not None and p is out.weight}


def _is_meta(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    t = module._parameters.get(attr, module._buffers.get(attr))
    return t is not None and t.is_meta


def _cast(tensor: torch.Tensor, model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters.get(attr, module._buffers.get(attr))
    if current is not None and current.is_floating_point() and tensor.is_floating_point():
        return tensor.to(current.dtype)
    return tensor
