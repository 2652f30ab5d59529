"""Registry of MoE architecture adapters, keyed by `config.model_type`."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from . import deepseek, gpt_oss, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe
from .base import MoEAdapter

_REGISTRY: dict[str, MoEAdapter] = {}


def register(adapter: MoEAdapter) -> MoEAdapter:
    """Add an adapter for every model type it names (a later registration wins)."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


for _module in (mixtral, phimoe, qwen2_moe, qwen3_moe, olmoe, deepseek, gpt_oss):
    for _adapter in _module.ADAPTERS:
        register(_adapter)


def supported() -> dict[str, str]:
    """model_type -> family name of every supported architecture."""
    return {mt: a.family for mt, a in sorted(_REGISTRY.items())}


def get_adapter(config_or_model) -> MoEAdapter:
    """The adapter for a model or config; a clear error for dense or unknown architectures."""
    config = getattr(config_or_model, "config", config_or_model)
    config = getattr(config, "text_config", None) or config
    model_type = getattr(config, "model_type", None)
    families = ", ".join(f"{f} ({mt})" for mt, f in supported().items())
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported Mixture-of-Experts architecture; "
            f"moeprune supports: {families}"
        )
    if not adapter.moe_layers(config):
        raise UnsupportedModelError(
            f"model type {model_type!r} is configured with no MoE layer (every layer is dense); "
            f"nothing to prune. Supported families: {families}"
        )
    return adapter


__all__ = ["MoEAdapter", "get_adapter", "register", "supported"]
