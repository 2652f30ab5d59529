"""Checkpoint assembly: turn the tensors of a safetensors checkpoint into the tensors of a model.

One way down for every loader (`load_slim`, the serving `ExpertPool`, `export`, and profiling of
quantized checkpoints): `Checkpoint(path)` opens the folder, its config, the family's adapter
(which knows the checkpoint's key layout) and the codec of its quantization scheme (which knows
how a weight is stored and decoded). On top of those it builds

- the routers of every MoE layer (read whole: small, and they identify the model: fingerprint);
- a meta-device skeleton of the model with per-layer expert counts (and router rows);
- the reads that fill it: each tensor whole, and only the wanted experts of each MoE layer (hub
  per-expert keys, or rows of tensors fused over experts), decoded by the codec;
- the fill itself, which checks shape and dtype class, then ties and checks nothing is left.

Every checkpoint key must be used, belong to an expert, or be one the adapter says is skipped
(DeepSeek's multi-token-prediction layer, stored rotary tables); anything else is an error, so a
companion tensor nobody decodes can never be dropped silently.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .codecs import PLAIN_FLOATS, Codec, codec_for_folder
from .errors import MoepruneError
from .fingerprint import fingerprint_from_parts
from .models import check_model_path, load_config, parse_dtype
from .pattern import Pattern
from .reader import INDEX_NAME, SINGLE_NAME, CheckpointReader
from .routers import get_adapter
from .routers.base import MoEAdapter

Job = Callable[[], object]


@dataclass(frozen=True)
class Read:
    """One tensor to read whole: in-memory `name`, checkpoint `key`, decoded `shape` and buffer `dtype`."""

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def model_folder(model_path: str | os.PathLike) -> str:
    """A local checkpoint folder for a folder path or a hub id (downloaded where the hub is reachable)."""
    path = check_model_path(model_path)
    if os.path.isdir(path):
        return path
    try:
        return _download_checkpoint(path)
    except MoepruneError:
        raise
    except Exception as e:
        raise MoepruneError(f"model folder not found and hub download failed for {model_path}: {e}") from None


# Root files moeprune (and the export it writes) reads besides the weights: configs, tokenizer, chat
# template, hf_quant_config.json. All small. Only root files count: subfolders (GPT-OSS `original/`,
# `metal/`) hold other formats of the same weights.
_HUB_SMALL_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def _hub_fetch_plan(repo_id: str, files: list[str]) -> tuple[list[str], bool]:
    """The root small files to fetch from a hub repo listing, and whether the weights come via the index.

    Weights are `model.safetensors.index.json`'s shards, else `model.safetensors`; anything else
    (`consolidated*.safetensors`, `*.bin`, `*.pth`, `*.gguf`) is never fetched.
    """
    root = [f for f in files if "/" not in f]
    if "config.json" not in root:
        raise MoepruneError(f"hub repo {repo_id} has no config.json at its root: not a transformers checkpoint")
    small = [f for f in root if f.endswith(_HUB_SMALL_SUFFIXES)]
    if INDEX_NAME in root:
        return small, True
    if SINGLE_NAME in root:
        return small + [SINGLE_NAME], False
    shown = ", ".join(sorted(files)[:12]) + (f", ... ({len(files) - 12} more)" if len(files) > 12 else "")
    raise MoepruneError(f"hub repo {repo_id} has neither {INDEX_NAME} nor {SINGLE_NAME} at its root "
                        f"(moeprune reads safetensors only); it has: {shown}")


def _index_shards(index: Path, repo_id: str, files: list[str]) -> list[str]:
    """The shard files a downloaded index names, each checked against the repo listing."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise MoepruneError(f"hub repo {repo_id}: corrupt {INDEX_NAME} (needs a 'weight_map' object)") from None
    missing = [s for s in shards if not isinstance(s, str) or s not in files]
    if missing:
        raise MoepruneError(f"hub repo {repo_id}: {INDEX_NAME} names shards the repo lacks: "
                            f"{', '.join(map(str, missing[:5]))}")
    return shards


def _download_checkpoint(repo_id: str) -> str:
    """Download only what moeprune reads of hub repo `repo_id`; returns the snapshot folder."""
    from huggingface_hub import model_info, snapshot_download

    info = model_info(repo_id)
    files = [s.rfilename for s in (info.siblings or [])]
    small, via_index = _hub_fetch_plan(repo_id, files)

    def fetch(names: list[str]) -> str:
        # exact names, escaped: allow_patterns are globs, and `*.json` would also match `original/config.json`
        folder = snapshot_download(repo_id, allow_patterns=[glob.escape(n) for n in names])
        if info.sha and Path(folder).name != info.sha:  # main moved since the listing: its index may differ
            raise MoepruneError(f"hub repo {repo_id} changed during the download (listed at {info.sha}, "
                                f"now {Path(folder).name}); run again")
        return folder

    # config.json comes last: models._hub_cache takes a cached snapshot with config.json as complete, so an
    # interrupted download must not leave one behind without its shards
    rest = [f for f in small if f != "config.json"]
    if via_index:
        folder = fetch(rest)  # the index is among the small files
        rest = _index_shards(Path(folder) / INDEX_NAME, repo_id, files)
    if rest:
        fetch(rest)
    return fetch(["config.json"])


def run_reads(jobs: list[Job], threads: int) -> None:
    """Run reads on a few threads: pread releases the GIL, so one core's worth of copying overlaps I/O."""
    if threads <= 1 or len(jobs) < 2:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(lambda job: job(), jobs):
            pass


def checkpoint_name(reader: CheckpointReader, name: str, adapter: MoEAdapter) -> str | None:
    """The checkpoint key holding in-memory tensor `name`, or None."""
    for c in adapter.ckpt_candidates(name):
        if c in reader:
            return c
    return None


def read_routers(reader: CheckpointReader, adapter: MoEAdapter, layers: list[int],
                 codec: Codec | None = None) -> dict[str, torch.Tensor]:
    """Full router tensors (weight, bias, correction bias) of every MoE layer, by in-memory name.

    A router must be stored unquantized: it picks the experts and gives the fingerprint.
    """
    out = {}
    for layer in layers:
        for name in adapter.router_keys(layer):
            key = checkpoint_name(reader, name, adapter)
            if key is None and codec is not None:
                stored = next((c for c in adapter.ckpt_candidates(name) if codec.stored(reader, c)), None)
                if stored is not None:  # only as quantized companions (e.g. weight_packed)
                    raise MoepruneError(f"router tensor {stored} of {reader.folder} is stored quantized "
                                        f"({codec.describe()}): moeprune needs unquantized routers "
                                        f"(they choose the experts and identify the model)")
            if key is None:
                if name.endswith(".weight"):
                    raise MoepruneError(f"checkpoint {reader.folder} lacks the router weight of layer {layer} ({name})")
                continue
            if codec is not None:
                codec.check(reader, key)
            dtype = reader.dtype(key)
            if dtype not in PLAIN_FLOATS or (codec is not None and codec.encoded(reader, key)):
                raise MoepruneError(f"router tensor {key} of {reader.folder} is stored as "
                                    f"{str(dtype).removeprefix('torch.')}: moeprune needs unquantized routers "
                                    f"(they choose the experts and identify the model)")
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


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in parameter or buffer `name`, cast to its dtype; refuse a shape or a dtype class
    that does not fit (a quantized code is never cast to a float: only a codec decodes it)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters.get(attr, module._buffers.get(attr))
    if current is None:
        raise MoepruneError(f"internal: {name} is neither a parameter nor a buffer")
    if tuple(value.shape) != tuple(current.shape):
        raise MoepruneError(f"{name}: the checkpoint gives shape {list(value.shape)}, the model built from "
                            f"its config expects {list(current.shape)}")
    _check_dtype_class(name, value.dtype, current.dtype)
    value = value.to(current.dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _check_dtype_class(name: str, stored: torch.dtype, wanted: torch.dtype) -> None:
    if wanted.is_floating_point:
        ok = stored in PLAIN_FLOATS
    else:
        ok = not stored.is_floating_point and (stored == torch.bool) == (wanted == torch.bool)
    if not ok:
        raise MoepruneError(f"{name}: the checkpoint holds {str(stored).removeprefix('torch.')} values where the "
                            f"model needs {str(wanted).removeprefix('torch.')}, and no codec decodes them")


def _resize_meta(model: nn.Module, name: str, rows: int) -> None:
    """Give meta tensor `name` `rows` rows on dim 0 (a layer that holds a different expert count)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters.get(attr, module._buffers.get(attr))
    if current is None or (current.is_meta and current.shape[0] == rows):
        return
    # buffers are real under init_empty_weights; a meta one left unfilled is then caught by `finish`
    meta = torch.empty((rows, *current.shape[1:]), dtype=current.dtype, device="meta")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(meta, requires_grad=False)
    else:
        module._buffers[attr] = meta


class Checkpoint:
    """A checkpoint folder opened for assembly: `folder`, `config`, `adapter`, `codec`, `reader`,
    `layers` (MoE layer indices), `num_experts`. The codec is chosen (or the scheme refused)
    before any tensor is read. Close it (or use `with`) to close the shards."""

    def __init__(self, model_path: str | os.PathLike, record_reads: bool = False):
        self.folder = model_folder(model_path)
        self.config = load_config(self.folder)
        self.adapter = get_adapter(self.config)
        self.codec = codec_for_folder(self.folder)
        self.layers = self.adapter.moe_layers(self.config)
        self.num_experts = self.adapter.num_experts(self.config)
        self.reader = CheckpointReader(self.folder, record=record_reads)
        self._router_keys: set[str] = set()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ header facts
    def key_of(self, name: str) -> str | None:
        """The checkpoint key of in-memory tensor `name` (a weight the codec stores only through its
        companions counts as present), or None."""
        for c in self.adapter.ckpt_candidates(name):
            if self.codec.stored(self.reader, c):
                return c
        return None

    def expert_layout(self, layer: int) -> str:
        """'fused' (tensors fused over experts) or 'per_expert' (hub keys per expert) for a MoE layer."""
        fused = self.adapter.fused_keys(layer)
        if all(self.key_of(n) is not None for n in fused):
            return "fused"
        parts = self.adapter.expert_parts(layer, 0)
        if parts and any(self.codec.stored(self.reader, p.key) for p in parts):
            return "per_expert"
        also = f" or {parts[0].key}" if parts else ""
        # quantized companions under a config that does not say so (e.g. `*_blocks` without
        # quant_method mxfp4): name what is there rather than say the experts are missing
        prefixes = (fused[0], *([parts[0].key] if parts else []))
        stored = sorted(k for k in self.reader.keys() if k.startswith(prefixes))  # noqa: SIM118
        if stored:
            raise MoepruneError(f"checkpoint {self.folder} stores the experts of layer {layer} as {', '.join(stored[:3])}, "
                                f"which its config.json's quantization_config does not describe (a quantized "
                                f"checkpoint whose config lost its quantization_config?)")
        raise MoepruneError(f"checkpoint {self.folder} lacks the experts of layer {layer} ({fused[0]}{also})")

    def dtype(self, requested=None) -> torch.dtype:
        """`requested`, else the dtype the config declares, else the first plain float dtype stored."""
        d = parse_dtype(requested)
        if d is not None:
            return d
        d = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if isinstance(d, torch.dtype):
            return d
        if isinstance(d, str) and d != "auto":
            return parse_dtype(d)
        for key in self.reader.keys():  # noqa: SIM118 - the reader has no __iter__
            if self.reader.dtype(key) in PLAIN_FLOATS:
                return self.reader.dtype(key)
        return torch.float32

    # ------------------------------------------------------------------ routers, identity
    def read_routers(self) -> dict[str, torch.Tensor]:
        """Full router tensors of every MoE layer, by in-memory name."""
        out = read_routers(self.reader, self.adapter, self.layers, self.codec)
        self._router_keys = {self.key_of(name) for name in out}
        return out

    def fingerprint(self, routers: dict[str, torch.Tensor]) -> str:
        return checkpoint_fingerprint(self.config, routers, self.adapter, self.layers)

    def check_pattern(self, pattern: Pattern, fingerprint: str | None) -> None:
        check_pattern(pattern, self.config, self.adapter, fingerprint)

    # ------------------------------------------------------------------ skeleton
    def model_config(self, n_experts: int):
        """The config of a model holding `n_experts` experts per layer, in plain (decoded) floats."""
        config = self.adapter.sliced_config(self.config, n_experts)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the model holds decoded weights; saving it must not claim otherwise
        return config

    def skeleton(self, config, dtype: torch.dtype, experts: dict[int, int], router_rows: dict[int, int]) -> nn.Module:
        """A meta-device model of `config` whose MoE layer i holds `experts[i]` experts and a router
        of `router_rows[i]` rows (parameters cost no memory until filled)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        top_k = self.adapter.top_k(self.config)
        for layer, block in self.adapter.blocks(model):
            self.adapter.resize(block, experts[layer], router_rows[layer], top_k)
            for name in self.adapter.fused_keys(layer):
                _resize_meta(model, name, experts[layer])
            for name in self.adapter.router_keys(layer):
                _resize_meta(model, name, router_rows[layer])
        return model

    # ------------------------------------------------------------------ reads
    def check_experts(self, layer: int, experts: list[int]) -> str:
        """Refuse, from the header alone, experts of a layer that are incomplete or that the codec
        cannot decode (companions, scale grids). Returns the layer's expert layout."""
        reader, codec = self.reader, self.codec
        layout = self.expert_layout(layer)
        if layout == "fused":
            for name in self.adapter.fused_keys(layer):
                codec.check(reader, self.key_of(name), experts=self.num_experts)
            return layout
        for e in experts:
            for p in self.adapter.expert_parts(layer, e):
                if not codec.stored(reader, p.key):  # GPTQ/AWQ store a weight only as its companions
                    raise MoepruneError(f"checkpoint {self.folder} lacks {p.key}")
                codec.check(reader, p.key)
        return layout

    def expert_reads(self, layer: int, experts: list[int],
                     dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[Job]]:
        """Buffers for the fused tensors of a layer holding `experts` (in that order), and the reads
        that fill them. Quantized weights are decoded into `dtype`; plain ones keep their stored
        dtype (read byte for byte, cast when filled)."""
        if not experts:
            return {}, []
        reader, codec, adapter = self.reader, self.codec, self.adapter
        out: dict[str, torch.Tensor] = {}
        jobs: list[Job] = []
        if self.check_experts(layer, experts) == "fused":
            for name in adapter.fused_keys(layer):
                key = self.key_of(name)
                buf = torch.empty((len(experts), *codec.shape(reader, key)[1:]),
                                  dtype=codec.buffer_dtype(reader, key, dtype))
                out[name] = buf
                jobs.append(lambda key=key, buf=buf: codec.read_into(reader, key, buf, rows=experts))
            return out, jobs
        names = dict(zip(adapter.expert_tensors, adapter.fused_keys(layer), strict=False))
        plan = [adapter.expert_parts(layer, e) for e in experts]
        form: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # tensor -> (one part's shape, buffer dtype)
        for parts in plan:
            for p in parts:
                got = (tuple(codec.shape(reader, p.key)), codec.buffer_dtype(reader, p.key, dtype))
                want = form.setdefault(p.tensor, got)
                if got != want:
                    raise MoepruneError(f"{p.key} of {self.folder} is {list(got[0])} {got[1]}, unlike the other "
                                        f"parts of layer {layer}'s {p.tensor} ({list(want[0])} {want[1]})")
        for tensor, (shape, buf_dtype) in form.items():
            count = plan[0][[p.tensor for p in plan[0]].index(tensor)].count
            out[names[tensor]] = torch.empty((len(experts), shape[0] * count, *shape[1:]), dtype=buf_dtype)
        for j, parts in enumerate(plan):
            for p in parts:
                n = form[p.tensor][0][0]
                # each part lands in its slice of the fused row: no concatenation copies
                view = out[names[p.tensor]][j, p.index * n:(p.index + 1) * n]
                jobs.append(lambda key=p.key, view=view: codec.read_into(reader, key, view))
        return out, jobs

    def backbone_plan(self, model: nn.Module, skip: set[str]) -> tuple[list[Read], set[str]]:
        """What to read for every tensor of `model` not in `skip` (nor tied), checked against the
        headers without reading a byte, and the checkpoint keys that uses (companions included)."""
        reader, codec = self.reader, self.codec
        plan: list[Read] = []
        used: set[str] = set()
        tied = tied_names(model)
        for name, current in list(model.named_parameters()) + list(model.named_buffers()):
            if name in skip:
                continue
            key = self.key_of(name)
            if name in tied:
                if key is not None:
                    used.add(key)  # a stored copy of a tied tensor: transformers ignores it too
                continue
            if key is None:
                if current.is_meta:
                    raise MoepruneError(f"checkpoint {self.folder} lacks tensor {name}")
                continue  # a buffer computed at construction (rotary tables) and not stored
            codec.check(reader, key)
            shape = tuple(codec.shape(reader, key))
            if shape != tuple(current.shape):
                raise MoepruneError(f"tensor {key} of {self.folder} has shape {list(shape)}, the model built from "
                                    f"its config expects {list(current.shape)}")
            buf_dtype = codec.buffer_dtype(reader, key, current.dtype)
            _check_dtype_class(key, buf_dtype, current.dtype)  # before any byte is read
            plan.append(Read(name, key, shape, buf_dtype))
            used.add(key)
            used.update(codec.companions(reader, key))
        return plan, used

    def plan_reads(self, plan: Iterable[Read]) -> tuple[dict[str, torch.Tensor], list[Job]]:
        """Buffers for the tensors of `plan` and the reads that fill them."""
        buffers: dict[str, torch.Tensor] = {}
        jobs: list[Job] = []
        for r in plan:
            buf = torch.empty(r.shape, dtype=r.dtype)
            buffers[r.name] = buf
            jobs.append(lambda key=r.key, buf=buf: self.codec.read_into(self.reader, key, buf))
        return buffers, jobs

    def check_keys(self, used: Iterable[str]) -> None:
        """Refuse a checkpoint key that is not in `used`, not a router, not an expert's (with its
        companions) and not one the adapter skips on purpose."""
        reader, codec, adapter = self.reader, self.codec, self.adapter
        known = set(used) | self._router_keys
        for layer in self.layers:
            if self.expert_layout(layer) == "fused":
                keys: list[str] = [self.key_of(n) for n in adapter.fused_keys(layer)]
            else:
                keys = [p.key for e in range(self.num_experts) for p in adapter.expert_parts(layer, e)]
            for key in keys:
                if codec.stored(reader, key):
                    known.add(key)
                    known.update(codec.companions(reader, key))
        left = [k for k in reader.keys() if k not in known  # noqa: SIM118 - the reader has no __iter__
                 and adapter.skipped_key(self.config, k) is None]
        if left:
            more = f" and {len(left) - 1} more" if len(left) > 1 else ""
            raise MoepruneError(
                f"checkpoint {self.folder} holds tensors moeprune does not know how to use ({self.codec.describe()}): "
                f"{left[0]} ({str(reader.dtype(left[0])).removeprefix('torch.')} {list(reader.shape(left[0]))}){more}; "
                f"refusing rather than ignoring them")

    # ------------------------------------------------------------------ fill
    def load_into(self, model: nn.Module, routers: dict[str, torch.Tensor],
                  experts: dict[int, list[int]] | None = None, threads: int = 4) -> None:
        """Fill skeleton `model`: `routers` (by in-memory name) as given, each MoE layer's experts
        `experts[layer]` (original ids, in slot order; None: leave the expert tensors to the caller),
        every other tensor from the checkpoint. Checks every key before reading a byte."""
        fused = {name for layer in self.layers for name in self.adapter.fused_keys(layer)}
        dtype = next((p.dtype for n, p in model.named_parameters() if n in fused), torch.float32)
        buffers: dict[str, torch.Tensor] = {}
        jobs: list[Job] = []
        for layer, ids in (experts or {}).items():
            staged, layer_jobs = self.expert_reads(layer, ids, dtype)
            buffers.update(staged)
            jobs += layer_jobs
        plan, used = self.backbone_plan(model, fused | set(routers))
        self.check_keys(used)
        backbone, backbone_jobs = self.plan_reads(plan)
        buffers.update(backbone)
        run_reads(jobs + backbone_jobs, threads)
        buffers.update(routers)
        self.fill(model, buffers)

    @staticmethod
    def fill(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
        """Move `buffers` (emptied as it goes, so peak memory stays one copy) into the model."""
        for name in list(buffers):
            set_tensor(model, name, buffers.pop(name))

    def finish(self, model: nn.Module) -> None:
        """Tie what the config ties, and refuse a tensor left unfilled."""
        model.tie_weights()
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise MoepruneError(f"checkpoint {self.folder} lacks tensors: {', '.join(left[:5])}")

    def slim_skeleton(self, kept: dict[int, list[int]], dtype: torch.dtype,
                      routers: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A meta skeleton holding only experts `kept` (layer -> original ids, renumbered 0..k-1 in
        that order), the stock class sized per layer where counts differ, and its router rows."""
        counts = {layer: len(ids) for layer, ids in kept.items()}
        config = self.model_config(max(counts.values()))
        if len(set(counts.values())) > 1:
            config.moeprune_experts_per_layer = {str(k): v for k, v in counts.items()}
        model = self.skeleton(config, dtype, counts, counts)
        sliced = {}
        for layer, ids in kept.items():
            index = torch.as_tensor(ids, dtype=torch.long)
            for name in self.adapter.router_keys(layer):
                if name in routers:
                    sliced[name] = routers[name].index_select(0, index).contiguous()
        return model, sliced

    def load_experts(self, kept: dict[int, list[int]], dtype: torch.dtype, routers: dict[str, torch.Tensor],
                     threads: int = 4) -> nn.Module:
        """`slim_skeleton`, filled."""
        model, sliced = self.slim_skeleton(kept, dtype, routers)
        self.load_into(model, sliced, kept, threads)
        self.finish(model)
        return model


def tied_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    return {n for n, p in model.named_parameters() if out is not None and p is out.weight}
