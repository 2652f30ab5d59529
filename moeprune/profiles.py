"""`Profile`: per MoE layer and expert, what a domain's prompts asked of each expert.

Statistics are sums over real (non-padding) tokens, so two profiles of the same model merge by
adding them. On disk a profile is one folder: `profile.json` (metadata) and
`profile.safetensors` (the [n_moe_layers, n_experts] tensors and per-prompt signatures).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ._io import atomic_dir, read_json
from .errors import FormatVersionError, MoepruneError
from .version import PROFILE_FORMAT, __version__

# Summed statistics, each [n_moe_layers, n_experts] float64.
STATS = ("frequency", "mass", "tcess", "easy_ep", "gate_norm")

# Criterion name -> what it means. `scores()` turns the sums into these.
CRITERIA = {
    "frequency": "how many real tokens picked the expert (top-k hits)",
    "mass": "total gate weight the expert received",
    "tcess": "PreMoe TCESS: mean router probability (above the confidence threshold)",
    "easy_ep": "EASY-EP: sum of gate weight x expert output norm x token contribution",
    "reap": "REAP: mean over routed tokens of gate weight x expert output norm",
    "gate_norm": "sum of gate weight x expert output norm (REAP's numerator)",
}
_ALIASES = {"freq": "frequency", "easy-ep": "easy_ep", "easyep": "easy_ep", "gate-norm": "gate_norm"}


def criterion_name(name: str) -> str:
    """Canonical criterion name; a clear error for unknown ones."""
    if not isinstance(name, str):
        raise MoepruneError(f"criterion must be a name, one of {', '.join(CRITERIA)}; got {name!r}")
    key = _ALIASES.get(name.lower(), name.lower().replace("-", "_"))
    if key not in CRITERIA:
        raise MoepruneError(f"unknown criterion {name!r}; choose one of: {', '.join(CRITERIA)}")
    return key


@dataclass
class Profile:
    """Expert statistics of one model on one domain (or a merge of several runs)."""

    stats: dict[str, torch.Tensor]
    signatures: torch.Tensor  # [n_prompts, n_experts]: first MoE layer's mean router probability per prompt
    meta: dict = field(default_factory=dict)
    routing: torch.Tensor | None = None  # [n_moe_layers, n_tokens_kept, top_k] int16: per-token picks
    hidden_signatures: torch.Tensor | None = None  # [n_prompts, hidden]: mean router input, first MoE layer

    # ------------------------------------------------------------ views
    @property
    def moe_layers(self) -> list[int]:
        return list(self.meta["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_prompts(self) -> int:
        return int(self.meta["n_prompts"])

    @property
    def domain(self) -> str | None:
        return self.meta.get("domain")

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def scores(self, criterion: str) -> torch.Tensor:
        """Importance [n_moe_layers, n_experts] (float64) under a criterion; higher is more important."""
        c = criterion_name(criterion)
        if c == "reap":
            return self.stats["gate_norm"] / self.stats["frequency"].clamp(min=1)
        if c == "tcess":
            return self.stats["tcess"] / max(self.n_tokens, 1)
        return self.stats[c].clone()

    def select(self, keep: float | int = 0.5, criterion: str = "easy_ep", strategy: str = "uniform",
               seed: int = 0):
        """A `Pattern` keeping, per MoE layer, the experts this profile scores highest.

        `keep`: a fraction of each layer's experts (0 < keep <= 1) or a count per layer.
        `criterion`: frequency, mass, tcess, easy_ep, reap, gate_norm, or random (seeded).
        `strategy`: "uniform" (same count per layer) or "global" (same total, spent where the
        per-layer normalised scores are largest).
        """
        from .pattern import select

        return select(self, keep=keep, criterion=criterion, strategy=strategy, seed=seed)

    # ------------------------------------------------------------ merge
    def merge(self, other: Profile) -> Profile:
        """A profile of both runs: statistics add, signatures concatenate."""
        if not isinstance(other, Profile):
            raise MoepruneError(f"a profile merges only with another Profile, got {type(other).__name__}")
        for key in ("fingerprint", "moe_layers", "num_experts", "tcess_threshold"):
            if self.meta.get(key) != other.meta.get(key):
                raise MoepruneError(
                    f"cannot merge profiles with different {key}: {self.meta.get(key)!r} vs {other.meta.get(key)!r}"
                )
        meta = dict(self.meta)
        domains = [d for d in (self.domain, other.domain) if d]
        meta["domain"] = "+".join(dict.fromkeys("+".join(domains).split("+"))) if domains else None
        meta["n_prompts"] = self.n_prompts + other.n_prompts
        meta["n_tokens"] = self.n_tokens + other.n_tokens
        meta["created"] = _now()
        stats = {k: self.stats[k] + other.stats[k] for k in STATS}
        routing = None
        if self.routing is not None and other.routing is not None:
            routing = torch.cat([self.routing, other.routing], dim=1)
        hidden = None
        if self.hidden_signatures is not None and other.hidden_signatures is not None:
            hidden = torch.cat([self.hidden_signatures, other.hidden_signatures])
        return Profile(stats, torch.cat([self.signatures, other.signatures]), meta, routing, hidden)

    __add__ = merge

    # ------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the profile folder atomically; an existing non-empty folder needs `overwrite`."""
        tensors = {k: self.stats[k].contiguous() for k in STATS}
        tensors["signatures"] = self.signatures.contiguous()
        if self.routing is not None:
            tensors["routing"] = self.routing.contiguous()
        if self.hidden_signatures is not None:
            tensors["hidden_signatures"] = self.hidden_signatures.contiguous()
        with atomic_dir(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / "profile.safetensors"), metadata={"format": "moeprune-profile"})
            meta = dict(self.meta, format_version=PROFILE_FORMAT, moeprune_version=__version__)
            (tmp / "profile.json").write_text(_json(meta))
        return Path(path)

    save_pretrained = save

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        if not isinstance(path, (str, os.PathLike)):
            raise MoepruneError(f"a profile is loaded from a folder path, got {type(path).__name__}")
        path = Path(path)
        if not path.is_dir():
            raise MoepruneError(f"profile folder not found: {path}")
        meta = read_json(path / "profile.json", "profile metadata")
        version = meta.get("format_version")
        if not isinstance(version, int):
            raise MoepruneError(f"{path / 'profile.json'} has no format_version: not a moeprune profile")
        if version > PROFILE_FORMAT:
            raise FormatVersionError(
                f"profile {path} has format version {version}, newer than this moeprune "
                f"({__version__}) reads (<= {PROFILE_FORMAT}); upgrade moeprune"
            )
        missing_meta = [k for k in ("moe_layers", "num_experts", "top_k", "fingerprint", "n_tokens", "n_prompts")
                        if k not in meta]
        if missing_meta:
            raise MoepruneError(f"{path / 'profile.json'} lacks {', '.join(missing_meta)}: not a complete profile")
        tensor_file = path / "profile.safetensors"
        if not tensor_file.is_file():
            raise MoepruneError(f"profile statistics missing: {tensor_file}")
        try:
            tensors = load_file(str(tensor_file))
        except Exception as e:  # safetensors raises its own error types
            raise MoepruneError(f"cannot read profile statistics {tensor_file}: {e}") from None
        missing = [k for k in (*STATS, "signatures") if k not in tensors]
        if missing:
            raise MoepruneError(f"profile statistics {tensor_file} lack {missing}")
        shape = (len(meta["moe_layers"]), int(meta["num_experts"]))
        for k in STATS:
            if tuple(tensors[k].shape) != shape:
                raise MoepruneError(f"profile {path}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
        return cls({k: tensors[k] for k in STATS}, tensors["signatures"], meta, tensors.get("routing"),
                   tensors.get("hidden_signatures"))

    from_pretrained = load

    def __repr__(self) -> str:
        return (
            f"Profile(model_type={self.meta.get('model_type')!r}, domain={self.domain!r}, "
            f"prompts={self.n_prompts}, tokens={self.n_tokens}, layers={len(self.moe_layers)}, "
            f"experts={self.num_experts})"
        )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"
