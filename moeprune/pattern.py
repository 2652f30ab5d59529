"""`Pattern`: which experts each MoE layer keeps, and how a profile chooses them.

Selection keeps the highest-scoring experts of each layer. `strategy="uniform"` keeps the same
count in every layer (what PreMoe, EASY-EP and REAP do). `strategy="global"` spends one total
budget over all layers: each layer's scores become shares that sum to 1, every layer first gets
its minimum (top-k, or the group constraint), and the rest of the budget goes to the experts with
the largest shares anywhere, so a layer whose routing is spread out keeps more experts than one
whose routing is concentrated. Group-limited routers (DeepSeek) are chosen group by group so that
every group keeps the same count.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import atomic_write_json, read_json
from .budget import resolve_count
from .errors import FormatVersionError, MoepruneError
from .version import PATTERN_FORMAT, __version__

STRATEGIES = ("uniform", "global")


@dataclass
class Pattern:
    """Per MoE layer, the sorted original ids of the experts to keep."""

    kept: dict[int, list[int]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.kept, dict):
            raise MoepruneError(f"a pattern's kept experts must be a dict of layer -> expert ids, "
                                f"got {type(self.kept).__name__}")
        if not isinstance(self.meta, dict):
            raise MoepruneError(f"a pattern's meta must be a dict, got {type(self.meta).__name__}")
        if not self.kept:
            raise MoepruneError("a pattern must cover at least one MoE layer")
        kept = {}
        for layer, ids in self.kept.items():
            layer = int(layer) if isinstance(layer, str) and layer.isdigit() else _as_id(layer, "MoE layer")
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise MoepruneError(f"layer {layer}: kept experts must be a list of ids, got {ids!r}")
            ids = [_as_id(e, f"layer {layer}: expert id") for e in ids]
            if not ids:
                raise MoepruneError(f"layer {layer} keeps no expert; every MoE layer must keep at least top-k")
            if len(set(ids)) != len(ids):
                raise MoepruneError(f"layer {layer}: kept experts contain duplicates: {sorted(ids)}")
            kept[layer] = sorted(ids)
        self.kept = dict(sorted(kept.items()))
        n = self.meta.get("num_experts")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise MoepruneError(f"a pattern's num_experts must be a positive integer, got {n!r}")
            for layer, ids in self.kept.items():
                bad = [e for e in ids if not 0 <= e < n]
                if bad:
                    raise MoepruneError(f"layer {layer}: expert ids {bad} are out of range for a model with {n} "
                                        f"experts per layer")

    # ------------------------------------------------------------ views
    @property
    def layers(self) -> list[int]:
        return list(self.kept)

    @property
    def counts(self) -> dict[int, int]:
        return {layer: len(ids) for layer, ids in self.kept.items()}

    @property
    def is_uniform(self) -> bool:
        return len(set(self.counts.values())) <= 1

    @property
    def n_kept(self) -> int:
        return sum(self.counts.values())

    @property
    def num_experts(self) -> int:
        if "num_experts" not in self.meta:
            raise MoepruneError("this pattern does not record its model's expert count (meta['num_experts'])")
        return int(self.meta["num_experts"])

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("fingerprint")

    @property
    def digest(self) -> str:
        """A hash of which experts are kept, and of which model: equal digests, equal pruned models."""
        import hashlib

        data = json.dumps({"fingerprint": self.fingerprint, "kept": {str(k): v for k, v in sorted(self.kept.items())}},
                          sort_keys=True)
        return "sha256:" + hashlib.sha256(data.encode()).hexdigest()[:32]

    @property
    def kept_fraction(self) -> float:
        return self.n_kept / (len(self.kept) * self.num_experts)

    def keep_masks(self) -> dict[int, torch.Tensor]:
        """Layer -> bool [num_experts] mask of kept experts (for `moeprune.hooks.keep_mask`)."""
        masks = {}
        for layer, ids in self.kept.items():
            m = torch.zeros(self.num_experts, dtype=torch.bool)
            m[ids] = True
            masks[layer] = m
        return masks

    # ------------------------------------------------------------ set operations
    def _check_same_model(self, other: Pattern) -> None:
        if self.fingerprint != other.fingerprint or self.layers != other.layers:
            raise MoepruneError("patterns belong to different models (fingerprint or MoE layers differ)")

    def union(self, *others: Pattern) -> Pattern:
        """Every expert that any of the patterns keeps (no budget)."""
        kept = {layer: set(ids) for layer, ids in self.kept.items()}
        domains = list(self.meta.get("domains", []))
        for o in others:
            self._check_same_model(o)
            for layer, ids in o.kept.items():
                kept[layer] |= set(ids)
            domains += [d for d in o.meta.get("domains", []) if d not in domains]
        meta = dict(self.meta, domains=domains, strategy="union", criterion=self.meta.get("criterion"),
                    keep=None, created=_now())
        meta["budget"] = sum(len(v) for v in kept.values())
        return Pattern({layer: sorted(v) for layer, v in kept.items()}, meta)

    def jaccard_per_layer(self, other: Pattern) -> dict[int, float]:
        self._check_same_model(other)
        out = {}
        for layer, ids in self.kept.items():
            a, b = set(ids), set(other.kept[layer])
            out[layer] = len(a & b) / max(1, len(a | b))
        return out

    def jaccard(self, other: Pattern) -> float:
        """Mean over layers of |A & B| / |A | B|."""
        per = self.jaccard_per_layer(other)
        return sum(per.values()) / max(1, len(per))

    # ------------------------------------------------------------ disk
    def to_dict(self) -> dict:
        meta = dict(self.meta, format_version=PATTERN_FORMAT, moeprune_version=__version__)
        return {"format": "moeprune-pattern", **meta, "kept": {str(k): v for k, v in self.kept.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "pattern") -> Pattern:
        if not isinstance(data, dict) or data.get("format") != "moeprune-pattern" or "kept" not in data:
            raise MoepruneError(f"{source} is not a moeprune pattern")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise MoepruneError(f"{source} has no format_version")
        if version > PATTERN_FORMAT:
            raise FormatVersionError(
                f"{source} has pattern format version {version}, newer than this moeprune ({__version__}) "
                f"reads (<= {PATTERN_FORMAT}); upgrade moeprune"
            )
        raw = data["kept"]
        if not isinstance(raw, dict) or not raw:
            raise MoepruneError(f"{source}: 'kept' must map layer ids to lists of expert ids")
        kept = {}
        for k, v in raw.items():
            if not (isinstance(k, str) and k.isdigit()):
                raise MoepruneError(f"{source}: layer id {k!r} in 'kept' is not a non-negative integer")
            if not isinstance(v, list) or not v:
                raise MoepruneError(f"{source}: layer {k} must keep a non-empty list of expert ids, got {v!r}")
            kept[int(k)] = v
        for key, kind in (("fingerprint", str), ("num_experts", int)):
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                raise MoepruneError(f"{source}: '{key}' is missing or not a {kind.__name__}; a pattern must name "
                                    "the model it was made for (select it again from a profile)")
        meta = {k: v for k, v in data.items() if k not in ("kept", "format")}
        try:
            return cls(kept, meta)
        except MoepruneError as e:
            raise MoepruneError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    save_pretrained = save

    @classmethod
    def load(cls, path: str | os.PathLike) -> Pattern:
        if not isinstance(path, (str, os.PathLike)):
            raise MoepruneError(f"a pattern is loaded from a file path, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            path = path / "pattern.json"
        return cls.from_dict(read_json(path, "pattern file"), str(path))

    from_pretrained = load

    def __repr__(self) -> str:
        counts = sorted(set(self.counts.values()))
        per = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return (f"Pattern(model_type={self.meta.get('model_type')!r}, domains={self.meta.get('domains')}, "
                f"criterion={self.meta.get('criterion')!r}, strategy={self.meta.get('strategy')!r}, "
                f"layers={len(self.kept)}, kept/layer={per} of {self.meta.get('num_experts')})")


def as_pattern(value: Pattern | str | os.PathLike) -> Pattern:
    """A Pattern, or one loaded from a pattern .json (or a folder holding pattern.json)."""
    if isinstance(value, Pattern):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Pattern.load(value)
    raise MoepruneError(f"pattern must be a Pattern or the path of a pattern file, got {type(value).__name__}")


# ---------------------------------------------------------------------- selection
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_id(value, what: str) -> int:
    """An integer id (int, numpy or 0-d integer tensor); floats and bools are refused, never truncated."""
    if isinstance(value, bool):
        raise MoepruneError(f"{what} {value!r} is not an integer")
    try:
        i = operator.index(value)
    except TypeError:
        raise MoepruneError(f"{what} {value!r} is not an integer") from None
    if i < 0:
        raise MoepruneError(f"{what} {i} is negative")
    return i


def _unit(groups: dict | None) -> int:
    return int(groups["n_group"]) if groups else 1


def min_count(top_k: int, groups: dict | None) -> int:
    """Smallest number of experts a layer can keep."""
    if not groups:
        return top_k
    per = max(int(groups["min_per_group"]), math.ceil(top_k / int(groups["topk_group"])))
    return per * int(groups["n_group"])


def resolve_keep(keep: float | int, n_experts: int, top_k: int, groups: dict | None = None) -> int:
    """Experts per layer for a keep fraction (0 < keep <= 1) or count (int >= 2); errors name the fix."""
    count = resolve_count(keep, n_experts, "keep")
    lowest = min_count(top_k, groups)
    if count < lowest:
        raise MoepruneError(
            f"keep={keep} gives {count} experts per layer, below the minimum of {lowest} "
            f"(top-k = {top_k}{'; groups ' + str(groups) if groups else ''})"
        )
    unit = _unit(groups)
    if count % unit:
        lo, hi = count - count % unit, count - count % unit + unit
        raise MoepruneError(
            f"keep={keep} gives {count} experts per layer, but this router has {unit} expert groups that "
            f"must keep equal counts: use {max(lo, lowest)} or {min(hi, n_experts)}"
        )
    return count


def _layer_choice(scores: torch.Tensor, count: int, groups: dict | None) -> list[int]:
    """Top `count` experts of one layer (per group for group-limited routers). Ties: lower id first."""
    n = scores.numel()
    if not groups:
        order = sorted(range(n), key=lambda e: (-float(scores[e]), e))
        return sorted(order[:count])
    g = int(groups["n_group"])
    size, per = n // g, count // g
    kept = []
    for gi in range(g):
        ids = range(gi * size, (gi + 1) * size)
        kept += sorted(ids, key=lambda e: (-float(scores[e]), e))[:per]
    return sorted(kept)


def _unit_values(share: torch.Tensor, groups: dict | None) -> list[float]:
    """Value of each successive unit (one expert, or one expert per group) of a layer, descending."""
    if not groups:
        return sorted((float(x) for x in share), reverse=True)
    g = int(groups["n_group"])
    per_group = share.view(g, -1).sort(dim=-1, descending=True).values
    return per_group.sum(0).tolist()


def select_counts_global(shares: torch.Tensor, budget: int, top_k: int, groups: dict | None) -> list[int]:
    """Per-layer counts that spend `budget` experts where the per-layer shares are largest."""
    n_layers, n = shares.shape
    unit, lowest = _unit(groups), min_count(top_k, groups)
    if budget < lowest * n_layers or budget > n * n_layers:
        raise MoepruneError(f"a total budget of {budget} experts cannot cover {n_layers} layers "
                            f"(each keeps between {lowest} and {n})")
    counts = [lowest] * n_layers
    candidates = []
    for layer in range(n_layers):
        values = _unit_values(shares[layer], groups)
        for j in range(lowest // unit, n // unit):
            candidates.append((-values[j], layer, j))
    candidates.sort()
    for _, layer, _ in candidates[: (budget - lowest * n_layers) // unit]:
        counts[layer] += unit
    return counts


def layer_shares(scores: torch.Tensor) -> torch.Tensor:
    """Scores normalised per layer to non-negative shares that sum to 1 (uniform where all are zero)."""
    s = scores.double().clamp(min=0)
    total = s.sum(-1, keepdim=True)
    return torch.where(total > 0, s / total.clamp(min=1e-300), torch.full_like(s, 1.0 / s.shape[-1]))


def select_from_scores(
    scores: torch.Tensor,
    layers: Sequence[int],
    keep: float | int,
    top_k: int,
    groups: dict | None = None,
    strategy: str = "uniform",
) -> dict[int, list[int]]:
    """Kept experts per layer from a [n_layers, n_experts] score matrix."""
    if strategy not in STRATEGIES:
        raise MoepruneError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = scores.shape[-1]
    count = resolve_keep(keep, n, top_k, groups)
    shares = layer_shares(scores)
    if strategy == "uniform":
        counts = [count] * len(layers)
    else:
        counts = select_counts_global(shares, count * len(layers), top_k, groups)
    return {layer: _layer_choice(shares[i], counts[i], groups) for i, layer in enumerate(layers)}


def _criterion_scores(profile, criterion: str, seed: int) -> torch.Tensor:
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(profile.moe_layers), profile.num_experts, generator=g, dtype=torch.float64)
    return profile.scores(criterion)


def _pattern_meta(profile, criterion, keep, strategy, seed, domains, sources) -> dict:
    m = profile.meta
    meta = {
        "model_type": m.get("model_type"), "family": m.get("family"), "model": m.get("model"),
        "fingerprint": m.get("fingerprint"), "num_experts": profile.num_experts, "top_k": profile.top_k,
        "groups": m.get("groups"), "domains": domains, "criterion": criterion, "keep": keep,
        "strategy": strategy, "sources": sources, "created": _now(),
    }
    if criterion == "random":
        meta["seed"] = seed
    return meta


def _source(profile) -> dict:
    return {k: profile.meta.get(k) for k in ("domain", "n_prompts", "n_tokens", "created")}


def _check_choice(criterion, strategy, seed) -> str:
    from .profiles import criterion_name

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MoepruneError(f"seed must be an integer, got {seed!r}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise MoepruneError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return "random" if criterion == "random" else criterion_name(criterion)


def _check_profile(profile, what: str = "profile"):
    from .profiles import Profile

    if not isinstance(profile, Profile):
        raise MoepruneError(f"{what} must be a moeprune Profile, got {type(profile).__name__}")
    return profile


def select(profile, keep: float | int = 0.5, criterion: str = "easy_ep", strategy: str = "uniform",
           seed: int = 0) -> Pattern:
    """A pattern from one profile (see `Profile.select`)."""
    crit = _check_choice(criterion, strategy, seed)
    kept = select_from_scores(_criterion_scores(profile, crit, seed), profile.moe_layers, keep, profile.top_k,
                              profile.meta.get("groups"), strategy)
    meta = _pattern_meta(profile, crit, keep, strategy, seed, [profile.domain] if profile.domain else [],
                         [_source(profile)])
    meta["budget"] = sum(len(v) for v in kept.values())
    return Pattern(kept, meta)


def select_union(profiles: Sequence, keep: float | int = 0.5, criterion: str = "easy_ep",
                 strategy: str = "uniform", seed: int = 0) -> Pattern:
    """One pattern for several domains: each profile's scores become per-layer shares, which are
    summed before selecting (EASY-EP's mixed-domain mode)."""
    if not isinstance(profiles, (list, tuple)):
        raise MoepruneError(f"select_union takes a list of profiles, got {type(profiles).__name__}")
    profiles = [_check_profile(p, f"profile {i}") for i, p in enumerate(profiles)]
    if not profiles:
        raise MoepruneError("select_union needs at least one profile")
    crit = _check_choice(criterion, strategy, seed)
    first = profiles[0]
    for p in profiles[1:]:
        if p.fingerprint != first.fingerprint or p.moe_layers != first.moe_layers:
            raise MoepruneError("profiles of different models cannot be combined (fingerprints differ)")
    total = sum(layer_shares(_criterion_scores(p, crit, seed)) for p in profiles)
    kept = select_from_scores(total, first.moe_layers, keep, first.top_k, first.meta.get("groups"), strategy)
    domains = [p.domain for p in profiles if p.domain]
    meta = _pattern_meta(first, crit, keep, strategy, seed, domains, [_source(p) for p in profiles])
    meta["budget"] = sum(len(v) for v in kept.values())
    return Pattern(kept, meta)


# ---------------------------------------------------------------------- diagnostics
@dataclass
class Diagnostics:
    """Cheap checks of a pattern against calibration statistics, before any evaluation."""

    mass_kept: dict[int, float]  # share of the layer's routing mass that goes to kept experts
    miss_rate: dict[int, float] | None  # share of tokens whose top-k hits a pruned expert
    any_layer_miss: float | None  # share of tokens that hit a pruned expert in at least one layer
    n_tokens: int

    @property
    def mean_mass_kept(self) -> float:
        return sum(self.mass_kept.values()) / max(1, len(self.mass_kept))

    @property
    def mean_miss_rate(self) -> float | None:
        if self.miss_rate is None:
            return None
        return sum(self.miss_rate.values()) / max(1, len(self.miss_rate))


def diagnose(profile, pattern: Pattern) -> Diagnostics:
    """Routing mass kept and top-k miss rate of `pattern` on the tokens `profile` saw."""
    _check_profile(profile)
    pattern = as_pattern(pattern)
    if profile.fingerprint != pattern.fingerprint:
        raise MoepruneError("the profile and the pattern belong to different models (fingerprints differ)")
    masks = pattern.keep_masks()
    mass = profile.stats["mass"]
    kept_mass, miss = {}, None
    for i, layer in enumerate(profile.moe_layers):
        m = mass[i]
        kept_mass[layer] = float(m[masks[layer]].sum() / m.sum().clamp(min=1e-30))
    any_miss = None
    n_tokens = 0
    if profile.routing is not None and profile.routing.numel():
        miss, hit_any = {}, None
        for i, layer in enumerate(profile.moe_layers):
            picks = profile.routing[i].long()  # [N, K]
            hits = (~masks[layer][picks]).any(dim=-1)
            miss[layer] = float(hits.float().mean())
            hit_any = hits if hit_any is None else hit_any | hits
        any_miss = float(hit_any.float().mean())
        n_tokens = int(profile.routing.shape[1])
    return Diagnostics(kept_mass, miss, any_miss, n_tokens)
