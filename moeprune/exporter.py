"""`export(model_path, pattern, out_dir)`: a standard Hugging Face checkpoint holding only the
pattern's experts, which vanilla `AutoModelForCausalLM.from_pretrained` (and vLLM) load with no
custom code.

It streams: the output is planned from the safetensors headers, then written shard by shard, so
at most one output shard's tensors are in memory. Kept experts are renumbered 0..k-1 (transformers
stacks whatever expert keys exist in sorted order and ignores their ids).

Quantized checkpoints keep their format: a kept expert's tensors and their companions (block FP8
`weight_scale_inv`) are copied byte for byte, after the codec has checked them from the header;
a scheme moeprune has no codec for is refused. Names of experts anywhere in the quantization config
(lists such as `modules_to_not_convert`, `ignore`, AutoFP8's `ignored_layers`, `exclude_modules`; also
in `hf_quant_config.json` and AutoGPTQ's root `quantize_config.json`) are renumbered like the
experts, and dropped with them; a regex or glob that names experts by id is refused.
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
from .checkpoint import Checkpoint
from .codecs import LEGACY_GPTQ
from .errors import MoepruneError
from .fingerprint import fingerprint_from_parts
from .models import check_model_path
from .pattern import Pattern, as_pattern
from .reader import CheckpointReader
from .routers.base import MoEAdapter
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


def export_plan(ckpt: Checkpoint, pattern: Pattern | dict[int, list[int]], routers: dict,
          drop_extra: bool = True) -> list[_Out]:
    """Every output tensor, in checkpoint order, with how to read it (nothing is read until a load is
    called). `pattern` may also be layer -> source expert ids in output order (slot s holds ids[s])."""
    reader, adapter = ckpt.reader, ckpt.adapter
    kept = pattern.kept if isinstance(pattern, Pattern) else pattern
    layers = set(kept)
    new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in kept.items()}
    router_ckpt = {}
    for layer in layers:
        for mem, ck in zip(adapter.router_keys(layer), adapter.ckpt_router_keys(layer), strict=True):
            router_ckpt[ck] = (layer, mem)
            router_ckpt[mem] = (layer, mem)
    # Multi-token-prediction layers hold a MoE block of their own that no pattern covers: dropped
    # (the config says num_nextn_predict_layers 0) rather than copied with all experts.
    extra = set(adapter.extra_layers(ckpt.config))
    # the same tensor of every expert of a layer (pruned ones too): a codec may write a kept
    # expert's tensor from all of them (static input scales: the layer's max)
    siblings: dict[tuple[int, str], list[str]] = {}
    for key in reader.keys():  # noqa: SIM118 - the reader has no __iter__
        split = adapter.split_expert_key(key)
        if split and split[0] in layers:
            siblings.setdefault((split[0], split[2]), []).append(key)
    plan: list[_Out] = []
    for key in sorted(reader.keys()):
        if drop_extra and extra and adapter.key_layer(key) in extra:
            continue
        # per-expert keys are matched whatever their suffix: quantization companions travel with
        # their weight, byte for byte, renumbered like it
        split = adapter.split_expert_key(key)
        if split and split[0] in layers:
            layer, expert, _ = split
            if expert in new_id[layer]:
                name = adapter.renumber_expert_key(key, new_id[layer][expert])
                load = ckpt.codec.export_tensor(reader, key, siblings[(layer, split[2])])
                plan.append(_Out(name, reader.nbytes(key), load or (lambda key=key: reader.get(key))))
            continue
        fused = adapter.split_fused_key(key)
        if fused and fused[0] in layers:
            plan += _plan_fused(ckpt, key, fused[0], fused[1], kept[fused[0]])
            continue
        if key in router_ckpt:
            layer, mem = router_ckpt[key]
            index = torch.as_tensor(kept[layer], dtype=torch.long)
            t = routers[mem]
            plan.append(_Out(key, t[0].numel() * t.element_size() * len(index),
                             lambda t=t, index=index: t.index_select(0, index).contiguous()))
            continue
        plan.append(_Out(key, reader.nbytes(key), lambda key=key: reader.get(key)))
    return plan


class _RowOnce:
    """One expert's row of a fused tensor, read once and handed out in parts (gate, up), then dropped."""

    def __init__(self, reader: CheckpointReader, key: str, row: int, uses: int):
        self.reader, self.key, self.row, self.left = reader, key, row, uses
        self._data: torch.Tensor | None = None

    def part(self, index: int, count: int) -> torch.Tensor:
        if self._data is None:
            self._data = self.reader.get_rows(self.key, [self.row])[0]
        out = self._data.chunk(count, dim=0)[index].contiguous()
        self.left -= 1
        if self.left == 0:
            self._data = None
        return out


def _plan_fused(ckpt: Checkpoint, key: str, layer: int, tensor: str, kept: list[int]) -> list[_Out]:
    """Kept rows of a fused expert tensor; split into hub per-expert keys where the family has them."""
    reader, adapter = ckpt.reader, ckpt.adapter
    row_bytes = reader.nbytes(key) // max(1, reader.shape(key)[0])
    if not adapter.expert_parts(layer, 0):  # fused on the hub too: every companion has the expert on dim 0
        return [_Out(key, row_bytes * len(kept), lambda: reader.get_rows(key, kept))]
    if not any(p.tensor == tensor for p in adapter.expert_parts(layer, 0)):
        raise MoepruneError(f"cannot export fused expert tensor {key} in the per-expert layout")
    if ckpt.codec.companions(reader, key):
        raise MoepruneError(f"cannot split the quantized fused expert tensor {key} into per-expert keys "
                            f"(its {', '.join(ckpt.codec.companions(reader, key))} would need splitting too)")
    out = []
    for new, old in enumerate(kept):
        parts = [p for p in adapter.expert_parts(layer, new) if p.tensor == tensor]
        row = _RowOnce(reader, key, old, len(parts))
        out += [_Out(p.key, row_bytes // p.count, lambda row=row, p=p: row.part(p.index, p.count)) for p in parts]
    return out


# Regex (compressed-tensors' `re:` prefix) or glob (`*` in ModelOpt and transformers lists) syntax.
_PATTERN_CHARS = re.compile(r"[*?\[\]()|^$+{}\\]")
_DROPPED = object()  # a list entry or dict item the rewrite removes (None is a JSON value)


def _is_pattern(name: str) -> bool:
    return name.startswith("re:") or _PATTERN_CHARS.search(name) is not None


def _rewrite_quantization(value, adapter: MoEAdapter, new_id: dict[int, dict[int, int]], where: str):
    """`value` (a quantization config, any JSON) with every name of an expert of a pruned layer
    renumbered through `new_id` (layer -> old id -> new id) and every name of a pruned expert
    removed (list entry, or dict item by key or value). Patterns stay, except one that names
    experts by id: which experts it would match after renumbering cannot be worked out, so refused."""
    def name(s: str) -> str | None:
        if _is_pattern(s):
            if adapter.pattern_names_expert(s):
                raise MoepruneError(f"{where} holds {s!r}, a pattern that names experts by id: the export renumbers "
                                    f"the experts and cannot rewrite a pattern; list those experts by name instead")
            return s
        split = adapter.split_expert_name(s)
        if split is None and (bare := adapter.split_layerless_expert_name(s)) is not None:
            return layerless(s, bare)
        # not an expert of a pruned layer: its module is copied whole (or dropped, as an MTP layer)
        if split is None or split[0] not in new_id:
            return s
        layer, old = split
        new = new_id[layer].get(old)
        return None if new is None else adapter.renumber_expert_name(s, new)

    counts = {len(ids) for ids in new_id.values()}
    bare_names = {n for n in _strings(value) if adapter.split_layerless_expert_name(n) and not _is_pattern(n)}

    def layerless(s: str, bare: tuple[str, int, str]) -> str | None:
        # A name without a layer means that expert of every layer. After the export every pruned layer
        # holds experts 0..k-1, so the rewrite is exact only when k is one number and the list names
        # every kept expert the same way: then experts 0..k-1 keep their names, the rest go.
        before, expert, after = bare
        named = {b[1] for n in bare_names if (b := adapter.split_layerless_expert_name(n)) and b[0::2] == (before, after)}
        kept_anywhere = {old for ids in new_id.values() for old in ids}
        if len(counts) != 1 or not kept_anywhere <= named:
            raise MoepruneError(f"{where} holds {s!r}, which names an expert without its layer; the export keeps "
                                f"different experts per layer, so it cannot be rewritten")
        return s if expert < next(iter(counts)) else None

    def walk(x):
        if isinstance(x, str):
            out = name(x)
            return _DROPPED if out is None else out
        if isinstance(x, list):
            return [y for y in map(walk, x) if y is not _DROPPED]
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                key = name(k) if isinstance(k, str) else k
                v = walk(v)
                if key is not None and v is not _DROPPED:
                    out[key] = v
            return out
        return x

    out = walk(value)
    return value if out is _DROPPED else out


def _strings(x) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, list):
        return [s for y in x for s in _strings(y)]
    if isinstance(x, dict):
        return [s for k, v in x.items() for s in [*_strings(k), *_strings(v)]]
    return []


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


def _config_json(data: dict, adapter: MoEAdapter, config, pattern: Pattern, routers: dict, mtp: str = "drop") -> dict:
    """The export's config.json from the source's (`data`, quantization lists already rewritten)."""
    data = dict(data)
    count = next(iter(pattern.counts.values()))
    aliases = getattr(config, "attribute_map", {}) or {}
    for field in {adapter.num_experts_field, aliases.get(adapter.num_experts_field, adapter.num_experts_field)}:
        if field in data or field == aliases.get(adapter.num_experts_field, adapter.num_experts_field):
            data[field] = count
    if count < adapter.top_k(config):
        data[adapter.top_k_field] = count
    if adapter.extra_layers(config) and mtp == "drop":
        data["num_nextn_predict_layers"] = 0  # their layers are not exported (see export_plan)
    # Provenance: the store retrieves with an export as with its source. The pruned model's own
    # fingerprint is recorded too, so an export whose routers were changed later is not taken for it.
    pruned = [routers[adapter.router_keys(layer)[0]].index_select(0, torch.as_tensor(ids, dtype=torch.long))
              for layer, ids in pattern.kept.items()]
    data["moeprune_source"] = {
        "fingerprint": pattern.fingerprint,
        "pruned_fingerprint": fingerprint_from_parts(adapter.sliced_config(config, count), pruned),
        "domains": pattern.meta.get("domains") or [],
        "pattern_digest": pattern.digest,  # which experts: tells a deployment whether this export is stale
        "moeprune_version": __version__,
    }
    return data


def _model_card(src: str, pattern: Pattern, config, adapter: MoEAdapter, n_params: int, note: str = "",
                mtp: str = "drop") -> str:
    m = pattern.meta
    k = next(iter(pattern.counts.values()))
    n = adapter.num_experts(config)
    codec_note = f"\n\n{note}" if note else ""  # what the quantization codec wrote differently
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
kept one, so quality outside the listed domains may drop.{_mtp_note(config, adapter, mtp, max(pattern.kept))}{codec_note}

## Kept experts (original ids) per MoE layer
| layer | kept experts |
|---|---|
{rows}

`pattern.json` in this folder is the moeprune pattern itself.
"""


def _mtp_note(config, adapter: MoEAdapter, mtp: str = "drop", last: int | None = None) -> str:
    extra = adapter.extra_layers(config)
    if not extra:
        return ""
    if mtp == "prune":
        return (f"\n\nThe multi-token-prediction layer{'s' if len(extra) > 1 else ''} "
                f"({', '.join(map(str, extra))}) keep the experts of the last MoE layer ({last}), renumbered the "
                f"same way, so speculative decoding with them still works.")
    return (f"\n\nThe multi-token-prediction layer{'s' if len(extra) > 1 else ''} of the source "
            f"({', '.join(map(str, extra))}) {'are' if len(extra) > 1 else 'is'} not included "
            f"(`num_nextn_predict_layers: 0`): speculative decoding with it is not available from this checkpoint.")


def export(
    model_path: str | os.PathLike,
    pattern: Pattern | str | os.PathLike,
    out_dir: str | os.PathLike,
    force: bool = False,
    max_shard_size: int | str = "2GB",
    progress: bool = False,
    mtp: str = "drop",
) -> Path:
    """Write `pattern`'s pruned model as a standard checkpoint in `out_dir`; returns its path.

    `mtp`: what happens to multi-token-prediction layers (DeepSeek-V3/R1), which no pattern covers:
    "drop" them (the config says num_nextn_predict_layers 0), or "prune" them with the last MoE
    layer's experts.

    An existing non-empty `out_dir` is replaced only with `force`, and never when it is, holds or lies
    inside the source checkpoint (checked before any work); a failed export leaves nothing behind.
    """
    pattern = as_pattern(pattern)
    if mtp not in ("drop", "prune"):
        raise MoepruneError(f"mtp must be 'drop' or 'prune', got {mtp!r}")
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
    with Checkpoint(src) as ckpt:  # refuses a quantization scheme it has no codec for
        config, adapter = ckpt.config, ckpt.adapter
        routers = ckpt.read_routers()
        ckpt.check_pattern(pattern, ckpt.fingerprint(routers))
        extra = adapter.extra_layers(config)
        last = max(pattern.kept)
        planned = pattern
        if mtp == "prune" and extra:  # the MTP layers take the last MoE layer's experts and router rows
            planned = Pattern({**pattern.kept, **{e: list(pattern.kept[last]) for e in extra}}, dict(pattern.meta))
            for e in extra:
                for mem, ck in zip(adapter.router_keys(e), adapter.ckpt_router_keys(e), strict=True):
                    t = ckpt.reader.get(ck)
                    if not t.is_floating_point():
                        raise MoepruneError(f"the router tensor {ck} is stored as {t.dtype}: a quantized router "
                                            f"cannot be sliced")
                    routers[mem] = t
        for layer, ids in planned.kept.items():  # every kept expert complete, scale grids as the codec expects
            ckpt.check_experts(layer, ids)
        # before any writing: a list the export cannot rewrite refuses the export
        new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in planned.kept.items()}
        data = json.loads((src / "config.json").read_text())
        for holder, where in ((data, "config.json quantization_config"),
                              (data.get("text_config"), "config.json text_config.quantization_config")):
            if isinstance(holder, dict) and "quantization_config" in holder:
                holder["quantization_config"] = _rewrite_quantization(holder["quantization_config"], adapter,
                                                                      new_id, where)
        # ModelOpt's hf_quant_config.json and AutoGPTQ's quantize_config.json: rewritten the same way
        # where they name experts, else copied byte for byte with the other small files
        side_configs = {}
        for fname in ("hf_quant_config.json", LEGACY_GPTQ):
            if not (src / fname).is_file():
                continue
            try:
                source = json.loads((src / fname).read_text())
            except ValueError:
                if fname == "hf_quant_config.json":
                    raise MoepruneError(f"cannot read {src / fname}: not JSON") from None
                continue  # not read by the codec (config.json has a quantization_config): copied as it is
            rewritten = _rewrite_quantization(source, adapter, new_id, fname)
            if rewritten != source:
                side_configs[fname] = rewritten
        plan = export_plan(ckpt, planned, routers, drop_extra=mtp == "drop")
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
            (tmp / "config.json").write_text(json.dumps(_config_json(data, adapter, config, pattern, routers, mtp), indent=2) + "\n")
            written = {"config.json", "README.md", "pattern.json"}
            for fname, rewritten in side_configs.items():
                (tmp / fname).write_text(json.dumps(rewritten, indent=2) + "\n")
                written.add(fname)
            for f in src.iterdir():
                if f.is_file() and not _WEIGHT_FILES.match(f.name) and f.name not in written:
                    shutil.copyfile(f, tmp / f.name)  # content only: the copy gets the umask's mode, not the source's
            _faults.point("export: config and tokenizer written")
            pattern.save(tmp / "pattern.json")
            (tmp / "README.md").write_text(_model_card(str(model_path), pattern, config, adapter, n_params,
                                                               ckpt.codec.export_note(), mtp))
            _faults.point("export: model card written")
    return out
