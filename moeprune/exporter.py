"""`export(model_path, pattern, out_dir)`: a standard Hugging Face checkpoint holding only the
pattern's experts, which vanilla `AutoModelForCausalLM.from_pretrained` (and vLLM) load with no
custom code.

It streams: the output is planned from the safetensors headers, then written shard by shard, so
at most one output shard's tensors are in memory. Kept experts are renumbered 0..k-1 (transformers
stacks whatever expert keys exist in sorted order and ignores their ids).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import _faults
from ._io import atomic_dir, check_output_dir
from .errors import MoepruneError
from .fingerprint import fingerprint_from_parts
from .models import check_model_path
from .pattern import Pattern, as_pattern
from .reader import CheckpointReader
from .routers import get_adapter
from .routers.base import MoEAdapter
from .slim import check_pattern, checkpoint_fingerprint, load_config, read_routers
from .version import __version__

_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5)$|^model\.safetensors\.index\.json$")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '2GB', '500MB', '20KiB'; refuses sizes below one byte."""
    how = "use e.g. 2GB, 500MB or a byte count"
    if isinstance(size, bool):
        raise MoepruneError(f"cannot read shard size {size!r} (--max-shard-size): {how}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise MoepruneError(f"cannot read shard size {size!r} (--max-shard-size): {how}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:  # 0 would put every tensor in a shard of its own
        raise MoepruneError(f"shard size (--max-shard-size) must be at least one byte, got {size!r}: {how}")
    return n


@dataclass
class _Out:
    name: str
    nbytes: int
    load: Callable[[], torch.Tensor]


def _plan(reader: CheckpointReader, adapter: MoEAdapter, pattern: Pattern, routers: dict) -> list[_Out]:
    """Every output tensor, in checkpoint order, with how to read it."""
    layers = set(pattern.kept)
    new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in pattern.kept.items()}
    router_ckpt = {}
    for layer in layers:
        for mem, ck in zip(adapter.router_keys(layer), adapter.ckpt_router_keys(layer), strict=True):
            router_ckpt[ck] = (layer, mem)
            router_ckpt[mem] = (layer, mem)
    per_expert = re.compile(r"^model\.layers\.(\d+)\.[^.]+\.experts\.(\d+)\.(.+)$")
    fused = re.compile(r"^model\.layers\.(\d+)\.[^.]+\.experts\.([a-z_]+)$")
    plan: list[_Out] = []
    for key in sorted(reader.keys()):
        m = per_expert.match(key)
        if m and int(m.group(1)) in layers:
            layer, expert = int(m.group(1)), int(m.group(2))
            if expert in new_id[layer]:
                name = f"{key[: m.start(2)]}{new_id[layer][expert]}.{m.group(3)}"
                plan.append(_Out(name, reader.nbytes(key), lambda key=key: reader.get(key)))
            continue
        m = fused.match(key)
        if m and int(m.group(1)) in layers:
            plan += _plan_fused(reader, adapter, key, int(m.group(1)), m.group(2), pattern.kept[int(m.group(1))])
            continue
        if key in router_ckpt:
            layer, mem = router_ckpt[key]
            index = torch.as_tensor(pattern.kept[layer], dtype=torch.long)
            t = routers[mem]
            plan.append(_Out(key, t[0].numel() * t.element_size() * len(index),
                             lambda t=t, index=index: t.index_select(0, index).contiguous()))
            continue
        plan.append(_Out(key, reader.nbytes(key), lambda key=key: reader.get(key)))
    return plan


def _plan_fused(reader, adapter: MoEAdapter, key: str, layer: int, tensor: str, kept: list[int]) -> list[_Out]:
    """Kept rows of a fused expert tensor; split into hub per-expert keys where the family has them."""
    row_bytes = reader.nbytes(key) // max(1, reader.shape(key)[0])
    if adapter.ckpt_expert_projs is None:
        return [_Out(key, row_bytes * len(kept), lambda: reader.get_rows(key, kept))]
    gate, up, down = adapter.ckpt_expert_projs
    out = []
    for new, old in enumerate(kept):
        base = f"model.layers.{layer}.{adapter.ckpt_block}.experts.{new}"
        if tensor == "gate_up_proj":
            def half(i, old=old):
                return lambda: reader.get_rows(key, [old])[0].chunk(2, dim=0)[i].contiguous()

            out += [_Out(f"{base}.{gate}.weight", row_bytes // 2, half(0)),
                    _Out(f"{base}.{up}.weight", row_bytes // 2, half(1))]
        elif tensor == "down_proj":
            out.append(_Out(f"{base}.{down}.weight", row_bytes, lambda old=old: reader.get_rows(key, [old])[0]))
        else:
            raise MoepruneError(f"cannot export fused expert tensor {key} in the per-expert layout")
    return out


def _shards(plan: list[_Out], max_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _config_json(src: Path, adapter: MoEAdapter, config, pattern: Pattern, routers: dict) -> dict:
    data = json.loads((src / "config.json").read_text())
    count = next(iter(pattern.counts.values()))
    aliases = getattr(config, "attribute_map", {}) or {}
    for field in {adapter.num_experts_field, aliases.get(adapter.num_experts_field, adapter.num_experts_field)}:
        if field in data or field == aliases.get(adapter.num_experts_field, adapter.num_experts_field):
            data[field] = count
    if count < adapter.top_k(config):
        data[adapter.top_k_field] = count
    # Provenance: the store retrieves with an export as with its source. The pruned model's own
    # fingerprint is recorded too, so an export whose routers were changed later is not taken for it.
    pruned = [routers[adapter.router_keys(layer)[0]].index_select(0, torch.as_tensor(ids, dtype=torch.long))
              for layer, ids in pattern.kept.items()]
    data["moeprune_source"] = {
        "fingerprint": pattern.fingerprint,
        "pruned_fingerprint": fingerprint_from_parts(adapter.sliced_config(config, count), pruned),
        "domains": pattern.meta.get("domains") or [],
        "moeprune_version": __version__,
    }
    return data


def _model_card(src: str, pattern: Pattern, config, adapter: MoEAdapter, n_params: int) -> str:
    m = pattern.meta
    k = next(iter(pattern.counts.values()))
    n = adapter.num_experts(config)
    rows = "\n".join(f"| {layer} | {', '.join(map(str, ids))} |" for layer, ids in pattern.kept.items())
    domains = ", ".join(m.get("domains") or []) or "-"
    sources = "; ".join(f"{s.get('domain') or '-'}: {s.get('n_prompts')} prompts, {s.get('n_tokens')} tokens"
                        for s in m.get("sources") or [])
    return f"""---
library_name: transformers
tags: [moe, expert-pruning, moeprune]
---
# Expert-pruned {adapter.family} model

This checkpoint is `{src}` with only {k} of its {n} routed experts kept in each of its
{len(pattern.kept)} MoE layers ({k / n:.0%}), chosen for: **{domains}**. It is an ordinary
transformers checkpoint: `AutoModelForCausalLM.from_pretrained` (and vLLM) load it with no custom code.

| | |
|---|---|
| source model | `{src}` (fingerprint `{pattern.fingerprint}`) |
| domains | {domains} |
| criterion | `{m.get('criterion')}` |
| keep budget | `{m.get('keep')}` -> {k} experts per layer, strategy `{m.get('strategy')}` |
| profiled on | {sources or '-'} |
| parameters | {n_params:,} |
| made with | moeprune {__version__} |

## How it was made
moeprune ran the domain's demonstration prompts through the full model, scored every expert of
every MoE layer by `{m.get('criterion')}`, kept the top {k} per layer, and copied the kept experts
(renumbered 0..{k - 1}) with their router rows; everything else (attention, embeddings, norms,
shared experts) is unchanged. Tokens the model routes to a dropped expert now go to the best
kept one, so quality outside the listed domains may drop.

## Kept experts (original ids) per MoE layer
| layer | kept experts |
|---|---|
{rows}

`pattern.json` in this folder is the moeprune pattern itself.
"""


def export(
    model_path: str | os.PathLike,
    pattern: Pattern | str | os.PathLike,
    out_dir: str | os.PathLike,
    force: bool = False,
    max_shard_size: int | str = "2GB",
    progress: bool = False,
) -> Path:
    """Write `pattern`'s pruned model as a standard checkpoint in `out_dir`; returns its path.

    An existing non-empty `out_dir` is replaced only with `force`, and never when it is, holds or lies
    inside the source checkpoint (checked before any work); a failed export leaves nothing behind.
    """
    pattern = as_pattern(pattern)
    src = Path(check_model_path(model_path))
    if not src.is_dir():
        raise MoepruneError(f"export needs a local checkpoint folder, got {model_path}")
    if not pattern.is_uniform:
        raise MoepruneError(
            "vanilla transformers holds one expert count for all layers, so a non-uniform (global-strategy) "
            f"pattern ({min(pattern.counts.values())}-{max(pattern.counts.values())} experts per layer) cannot "
            "be exported; select with strategy='uniform', or serve it with load_slim"
        )
    max_bytes = parse_size(max_shard_size)
    # before any reading: replacing a folder that is, holds or lies inside the source would destroy it
    out = check_output_dir(out_dir, force=force, protect=(src,), what="export folder")
    config = load_config(str(src))
    adapter = get_adapter(config)
    with CheckpointReader(src) as reader:
        routers = read_routers(reader, adapter, adapter.moe_layers(config))
        check_pattern(pattern, config, adapter, checkpoint_fingerprint(config, routers, adapter,
                                                                       adapter.moe_layers(config)))
        plan = _plan(reader, adapter, pattern, routers)
        shards = _shards(plan, max_bytes)
        with atomic_dir(out, overwrite=force, protect=(src,)) as tmp:
            names = (["model.safetensors"] if len(shards) == 1 else
                     [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
            weight_map, total, n_params = {}, 0, 0
            bar = tqdm(total=sum(x.nbytes for x in plan), unit="B", unit_scale=True, desc="exporting",
                       disable=not progress)
            for shard, fname in zip(shards, names, strict=True):
                tensors = {}
                for item in shard:
                    tensors[item.name] = item.load()
                    weight_map[item.name] = fname
                    total += tensors[item.name].numel() * tensors[item.name].element_size()
                    n_params += tensors[item.name].numel()
                    bar.update(item.nbytes)
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                del tensors
                _faults.point(f"export: {fname} written")
            bar.close()
            if len(shards) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(_config_json(src, adapter, config, pattern, routers), indent=2) + "\n")
            for f in src.iterdir():
                if f.is_file() and not _WEIGHT_FILES.match(f.name) and f.name not in ("config.json", "README.md",
                                                                                       "pattern.json"):
                    shutil.copyfile(f, tmp / f.name)  # content only: the copy gets the umask's mode, not the source's
            _faults.point("export: config and tokenizer written")
            pattern.save(tmp / "pattern.json")
            (tmp / "README.md").write_text(_model_card(str(model_path), pattern, config, adapter, n_params))
            _faults.point("export: model card written")
    return out
