"""What moeprune needs to know about one MoE family.

An adapter answers, for its family: which decoder layers are MoE, where the router and the
fused experts live (in memory and in a checkpoint), how the router turns logits into
(weights, indices) exactly as transformers does, and how a keep-mask makes pruned experts
unselectable so that the masked model equals a model that holds only the kept experts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoepruneError

NEG_INF = float("-inf")

# Hub checkpoint keys of experts: per expert (`...experts.{e}.{rest}`, any block name) or fused over
# experts (`...experts.{tensor}`). Suffix-agnostic: quantization companions match as well.
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.[^.]+\.experts\.(\d+)\.(.+)$")
_FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.[^.]+\.experts\.([a-z_]+)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# A module or tensor name naming one expert (quantization-config lists): the expert itself or
# anything below it (`...experts.5`, `...experts.5.gate_proj`, `...experts.5.gate_proj.weight`).
_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.[^.]+\.experts\.(\d+)(\..+)?$")
_LAYERLESS_EXPERT_NAME = re.compile(r"^(.*?\bexperts)\.(\d+)(\..+)?$")
# In a regex or glob: "experts" and a separator (`.`, `\.`, `[.]`), then the expert-id part, which
# ends at the next escaped dot or at a literal dot that starts a module name.
_PATTERN_EXPERT_ID = re.compile(r"experts(?:\\\.|\[\.\]|\.)(.*?)(?:\\\.|\.(?=[A-Za-z_])|$)")
# Spellings of "any digit" inside an id part: with them removed, a digit left is a literal id.
_ANY_DIGIT = re.compile(r"\\d|0-9")


@dataclass(frozen=True)
class ExpertPart:
    """One per-expert checkpoint weight and where it sits in the fused in-memory expert tensor:
    part `index` of `count` equal parts stacked along dim 0 of the expert's row of `tensor`."""

    tensor: str  # fused expert tensor attribute, e.g. "gate_up_proj"
    key: str  # per-expert checkpoint key of the weight (its codec companions go with it)
    index: int
    count: int


class MoEAdapter:
    """Base adapter. Subclasses set the class attributes and override the routing maths."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"

    # In-memory module layout: decoder_layer.<block_attr>.<router_attr> / .<experts_attr>
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    # The residual stream entering the MoE is the input of this norm (EASY-EP's h_t).
    residual_norm_attr: str = "post_attention_layernorm"
    # Router parameters and buffers whose first dimension is the expert.
    router_tensors: tuple[str, ...] = ("weight",)
    # Fused expert parameters (first dimension is the expert).
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")

    # Checkpoint (hub) layout.
    ckpt_block: str = "mlp"
    ckpt_router: str = "gate"
    # Per-expert hub keys: experts.{e}.{name}.weight, for gate/up/down. None: fused on disk too.
    ckpt_expert_projs: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")

    # ------------------------------------------------------------------ config
    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_field))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_field))

    def moe_layers(self, config) -> list[int]:
        """Indices of decoder layers whose MLP is a routed MoE block."""
        return list(range(config.num_hidden_layers))

    def sliced_config(self, config, n_experts: int):
        """A copy of `config` for a model that holds `n_experts` routed experts per layer."""
        new = copy.deepcopy(config)
        setattr(new, self.num_experts_field, int(n_experts))
        if self.top_k(config) > n_experts:
            setattr(new, self.top_k_field, int(n_experts))
        return new

    # ------------------------------------------------------------------ routing
    def router_probs(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """Per-token probability over all experts, float32 [T, E] (PreMoe's TCESS input)."""
        return torch.softmax(logits.float(), dim=-1)

    def route(
        self, router: nn.Module, logits: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, K], indices [T, K]) from router logits, as transformers computes them.

        `keep` is a bool [E] mask; pruned experts can never be chosen and the result equals a
        router that holds only the kept experts.
        """
        raise NotImplementedError

    def groups(self, config) -> dict | None:
        """Group-limited routing constraint: {"n_group", "topk_group", "min_per_group"}, or None."""
        return None

    def check_keep(self, config, kept: Sequence[int]) -> None:
        """Raise MoepruneError if a kept set cannot be realised for this family."""
        n, k = self.num_experts(config), self.top_k(config)
        ids = list(kept)
        if len(set(ids)) != len(ids):
            raise MoepruneError(f"kept experts contain duplicates: {ids}")
        if any(i < 0 or i >= n for i in ids):
            raise MoepruneError(f"kept expert ids must be in [0, {n}), got {ids}")
        if len(ids) < k:
            raise MoepruneError(
                f"a layer must keep at least top-k = {k} experts ({self.family} routes each token to {k}); got {len(ids)}"
            )

    # ------------------------------------------------------------------ modules
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        for path in ("model.layers", "layers", "model.model.layers", "language_model.model.layers"):
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList):
                return obj
        raise MoepruneError(f"cannot find the decoder layers of {type(model).__name__}")

    def blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(layer index, MoE block) for every MoE layer of a loaded model."""
        layers = self.decoder_layers(model)
        out = []
        for i in self.moe_layers(model.config):
            block = getattr(layers[i], self.block_attr)
            if not hasattr(block, self.experts_attr) or not hasattr(block, self.router_attr):
                raise MoepruneError(f"layer {i} of {type(model).__name__} is not an MoE block ({type(block).__name__})")
            out.append((i, block))
        return out

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_attr)

    def residual_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.residual_norm_attr)

    # ------------------------------------------------------------------ names
    def _prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block_attr}"

    def fused_keys(self, layer: int) -> list[str]:
        """State-dict names (in memory, fused) of the expert tensors of a layer; dim 0 = expert."""
        return [f"{self._prefix(layer)}.{self.experts_attr}.{t}" for t in self.expert_tensors]

    def router_keys(self, layer: int) -> list[str]:
        """State-dict names (in memory) of router tensors with a leading expert dimension."""
        return [f"{self._prefix(layer)}.{self.router_attr}.{t}" for t in self.router_tensors]

    def ckpt_router_keys(self, layer: int) -> list[str]:
        """Checkpoint (hub) names of the router tensors with a leading expert dimension."""
        return [f"model.layers.{layer}.{self.ckpt_block}.{self.ckpt_router}.{t}" for t in self.router_tensors]

    def ckpt_expert_keys(self, layer: int, expert: int) -> list[str]:
        """Hub per-expert checkpoint names of one expert (gate, up, down); [] if the family is fused on disk."""
        if self.ckpt_expert_projs is None:
            return []
        base = f"model.layers.{layer}.{self.ckpt_block}.experts.{expert}"
        return [f"{base}.{p}.weight" for p in self.ckpt_expert_projs]

    def ckpt_fused_keys(self, layer: int) -> list[str]:
        """Fused checkpoint names of a layer's experts (GPT-OSS on the hub; any family after conversion)."""
        return [f"model.layers.{layer}.{self.ckpt_block}.experts.{t}" for t in self.expert_tensors]

    # ------------------------------------------------------------------ checkpoint layout
    def ckpt_candidates(self, name: str) -> list[str]:
        """Checkpoint keys that may hold in-memory tensor `name`, in order of preference (hub
        spellings differ: block_sparse_moe, gate)."""
        b, r = self.block_attr, self.router_attr
        return list(dict.fromkeys([
            name,
            name.replace(f".{b}.{r}.", f".{self.ckpt_block}.{self.ckpt_router}."),
            name.replace(f".{b}.", f".{self.ckpt_block}."),
        ]))

    def expert_parts(self, layer: int, expert: int) -> list[ExpertPart]:
        """How one expert's per-expert checkpoint weights make its rows of the fused tensors:
        gate then up stacked into `gate_up_proj`, down alone in `down_proj`. [] when the family
        is fused on disk."""
        keys = self.ckpt_expert_keys(layer, expert)
        if not keys:
            return []
        gate, up, down = keys
        gate_up, down_proj = self.expert_tensors[:2]
        return [ExpertPart(gate_up, gate, 0, 2), ExpertPart(gate_up, up, 1, 2), ExpertPart(down_proj, down, 0, 1)]

    @staticmethod
    def split_expert_key(key: str) -> tuple[int, int, str] | None:
        """(layer, expert, rest) of a per-expert checkpoint key, or None."""
        m = _EXPERT_KEY.match(key)
        return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None

    @staticmethod
    def renumber_expert_key(key: str, new: int) -> str:
        """Per-expert checkpoint key `key` with its expert id replaced by `new`."""
        m = _EXPERT_KEY.match(key)
        if m is None:
            raise MoepruneError(f"internal: {key} is not a per-expert checkpoint key")
        return f"{key[: m.start(2)]}{new}.{m.group(3)}"

    @staticmethod
    def split_fused_key(key: str) -> tuple[int, str] | None:
        """(layer, tensor) of a checkpoint key fused over experts (`...experts.gate_up_proj`), or None."""
        m = _FUSED_KEY.match(key)
        return (int(m.group(1)), m.group(2)) if m else None

    @staticmethod
    def split_expert_name(name: str) -> tuple[int, int] | None:
        """(layer, expert) of a module or tensor name that names one expert of a decoder layer
        (`model.layers.3.mlp.experts.5` or anything below it), or None."""
        m = _EXPERT_NAME.match(name)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @staticmethod
    def split_layerless_expert_name(name: str) -> tuple[str, int, str] | None:
        """(before, expert, after) of a name that names an expert without its layer, as GPTQ's
        `modules_in_block_to_quantize` does (`block_sparse_moe.experts.7.w1`), or None."""
        if _EXPERT_NAME.match(name):
            return None
        m = _LAYERLESS_EXPERT_NAME.match(name)
        return (m.group(1), int(m.group(2)), m.group(3) or "") if m else None

    @staticmethod
    def renumber_expert_name(name: str, new: int) -> str:
        """Module or tensor name `name` (see `split_expert_name`) with its expert id replaced by `new`."""
        m = _EXPERT_NAME.match(name)
        if m is None:
            raise MoepruneError(f"internal: {name} does not name an expert")
        return f"{name[: m.start(2)]}{new}{m.group(3) or ''}"

    @staticmethod
    def pattern_names_expert(pattern: str) -> bool:
        """Whether a regex or glob over module names singles out experts by id (`experts\\.5\\.`,
        `experts.[0-3].*`), as opposed to matching every expert (`experts\\.\\d+`, `experts.*`)."""
        body = pattern[3:] if pattern.startswith("re:") else pattern
        return any(re.search(r"\d", _ANY_DIGIT.sub("", m.group(1))) for m in _PATTERN_EXPERT_ID.finditer(body))

    def extra_layers(self, config) -> list[int]:
        """Decoder-layer indices a checkpoint stores beyond the model's layers (multi-token prediction)."""
        return []

    @staticmethod
    def key_layer(key: str) -> int | None:
        """The decoder-layer index a checkpoint key belongs to (None: not a layer's key)."""
        m = _LAYER_KEY.match(key)
        return int(m.group(1)) if m else None

    def skipped_key(self, config, key: str) -> str | None:
        """Why a checkpoint key is deliberately not loaded (None: it must be used)."""
        if key.endswith("rotary_emb.inv_freq"):
            return "a rotary table (recomputed at construction)"
        m = _LAYER_KEY.match(key)
        if m and int(m.group(1)) in self.extra_layers(config):
            return "a multi-token-prediction layer (transformers never runs it)"
        return None

    def resize(self, block: nn.Module, experts: int, router_rows: int, top_k: int) -> None:
        """Make a MoE block's modules agree with `experts` experts and a router of `router_rows`
        rows (their forwards read these attributes)."""
        for module, count in ((block, experts), (self.experts(block), experts), (self.router(block), router_rows)):
            if hasattr(module, "num_experts"):
                module.num_experts = count
            if hasattr(module, "top_k") and isinstance(module.top_k, int):
                module.top_k = min(module.top_k, count, top_k)

    # ------------------------------------------------------------------ slicing
    def slice_state_dict(
        self, state_dict: dict[str, torch.Tensor], kept: dict[int, Sequence[int]]
    ) -> dict[str, torch.Tensor]:
        """A fused (in-memory) state dict holding only the kept experts of each layer, renumbered 0..k-1."""
        out = dict(state_dict)
        for layer, ids in kept.items():
            index = torch.as_tensor(sorted(ids), dtype=torch.long)
            for name in self.fused_keys(layer) + self.router_keys(layer):
                if name in out:
                    out[name] = out[name].index_select(0, index).contiguous()
        return out


def masked(logits: torch.Tensor, keep: torch.Tensor | None, fill: float = NEG_INF) -> torch.Tensor:
    """`logits` with pruned experts set to `fill` (no copy when nothing is pruned)."""
    if keep is None:
        return logits
    return logits.masked_fill(~keep.to(logits.device), fill)


def softmax_topk(
    logits: torch.Tensor,
    top_k: int,
    keep: torch.Tensor | None,
    normalise: bool,
    cast_back: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, optional renormalisation (Mixtral, Qwen, OLMoE)."""
    probs = torch.softmax(masked(logits, keep).float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cast_back:
        weights = weights.to(logits.dtype)
    return weights, indices


def moe_layers_by_step(config, n_experts: int) -> list[int]:
    """Qwen-style rule: MoE unless in `mlp_only_layers`, every `decoder_sparse_step`-th layer."""
    only = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return [
        i for i in range(config.num_hidden_layers) if i not in only and n_experts > 0 and (i + 1) % step == 0
    ]


def equal_group_counts(kept: Iterable[int], n_experts: int, n_group: int) -> list[int]:
    """How many kept experts fall in each of `n_group` contiguous groups."""
    size = n_experts // n_group
    counts = [0] * n_group
    for e in kept:
        counts[e // size] += 1
    return counts
