"""A model's identity: a hash of its structural config and its router weights.

Router weights are small (layers x experts x hidden), present in every checkpoint layout, and
differ between any two trained models, so they identify the weights cheaply. They are hashed
as bfloat16 so that a model loaded in bf16 from an fp32 checkpoint keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .routers import get_adapter

_CONFIG_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
    "moe_intermediate_size", "num_experts_per_tok",
)


def _config_part(config, adapter) -> dict:
    part = {f: getattr(config, f, None) for f in _CONFIG_FIELDS}
    part["num_experts"] = adapter.num_experts(config)
    return part


def fingerprint_from_parts(config, routers: list[torch.Tensor]) -> str:
    adapter = get_adapter(config)
    h = hashlib.sha256(json.dumps(_config_part(config, adapter), sort_keys=True).encode())
    for w in routers:
        h.update(w.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def model_fingerprint(model) -> str:
    """Fingerprint of a loaded (full) transformers MoE model. Router weights that are not in
    memory (accelerate's disk offload leaves them on the meta device) are read from the model's
    checkpoint folder instead."""
    adapter = get_adapter(model)
    routers = [adapter.router(block).weight for _, block in adapter.blocks(model)]
    if any(w.is_meta for w in routers):
        return _checkpoint_fingerprint(model)
    return fingerprint_from_parts(model.config, routers)


def _checkpoint_fingerprint(model) -> str:
    import os

    from .checkpoint import Checkpoint
    from .errors import MoepruneError

    folder = str(getattr(model.config, "_name_or_path", "") or "")
    if not os.path.isdir(folder):
        raise MoepruneError("the model's router weights are offloaded (on the meta device) and its checkpoint "
                            f"folder is unknown ({folder or 'no _name_or_path'}): cannot fingerprint it; "
                            "profile the checkpoint folder instead (it streams layer by layer)")
    with Checkpoint(folder) as ckpt:
        return ckpt.fingerprint(ckpt.read_routers())


def source_fingerprint(model) -> str:
    """The fingerprint of the full model that `model` is, or was pruned from.

    A full model is its own source. `load_slim` records its source on the model. An exported
    checkpoint records it in its config (`moeprune_source`), together with the fingerprint of the
    pruned model itself, which must match the loaded routers: an edited or re-trained export is
    its own model, not the source's.
    """
    fp = getattr(model, "moeprune_source_fingerprint", None)
    if fp:
        return fp
    own = model_fingerprint(model)
    src = getattr(model.config, "moeprune_source", None)
    if isinstance(src, dict) and src.get("pruned_fingerprint") == own and isinstance(src.get("fingerprint"), str):
        return src["fingerprint"]
    return own
