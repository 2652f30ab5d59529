"""Loading a transformers MoE model and its tokenizer from a folder (or the hub where it is reachable)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import MoepruneError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) == "auto":
        return None
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise MoepruneError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto") from None


def check_model_path(path: str | os.PathLike) -> str:
    """A local checkpoint folder for `path`; a hub id ('org/name') resolves to its cached copy.

    A hub id that is not cached is returned as is only when the hub can be reached, so an offline
    machine gets one clear error at once instead of half a minute of retries.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise MoepruneError(f"a model path must be a folder path or a hub id, got {type(path).__name__}")
    s = str(path)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MoepruneError(f"model path {s} is a file; give the checkpoint folder")
        if not (p / "config.json").is_file():
            raise MoepruneError(f"model folder {s} has no config.json: not a transformers checkpoint")
        return str(p)
    looks_local = s.startswith((".", "/", "~")) or s.count("/") != 1 or not all(s.split("/"))
    if looks_local:
        raise MoepruneError(f"model folder not found: {s}")
    cached = _hub_cache(s)
    if cached:
        return cached
    if _hub_offline():
        raise MoepruneError(f"model folder not found: {s}; as a hub id it is not in the local Hugging Face cache, "
                            "and the hub is switched off (HF_HUB_OFFLINE)")
    if not _hub_reachable():
        raise MoepruneError(f"model folder not found: {s}; as a hub id it is not in the local Hugging Face cache, "
                            "and the hub cannot be reached from this machine")
    return s


def _hub_cache(repo_id: str) -> str | None:
    """The cached snapshot folder of a hub model, or None (no download is attempted)."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # not cached, or not a valid repo id
        # moeprune downloads only part of a repo (checkpoint.model_folder), which newer huggingface_hub
        # reports as an incomplete snapshot: judge that one by what moeprune reads
        partial = getattr(e, "snapshot_path", None)
        return str(partial) if partial and _has_safetensors_weights(Path(partial)) else None
    return folder if (Path(folder) / "config.json").is_file() else None


def _has_safetensors_weights(folder: Path) -> bool:
    """Does `folder` hold config.json and every shard its index names (or model.safetensors)?"""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return (folder / "model.safetensors").is_file()
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / s).is_file() for s in shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub be opened? (DNS failure or a closed network: no.)"""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(path: str | os.PathLike, dtype=None, device: str = "cpu"):
    """(model, tokenizer) from a local folder or a hub id; a clear error when neither works.

    The model is assembled by moeprune's checkpoint layer (`slim.load_full`), the loader every
    moeprune path uses: quantized weights are decoded by moeprune's codec, deterministically and
    whatever the machine (a GPU would otherwise get native FP8 experts), and a whole model has
    bit for bit the numerics of the same model streamed layer by layer (transformers' loader
    keeps float32 tensors in unaligned mmap'd storage, whose SIMD paths round differently).
    """
    from .routers import get_adapter
    from .slim import load_full

    src = check_model_path(path)
    get_adapter(load_config(src))  # refuse dense or unsupported models before reading any weight
    return load_full(src, dtype=dtype, device=device), load_tokenizer(src)


def load_tokenizer(src: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise MoepruneError(f"cannot load a tokenizer from {src}: {str(e).splitlines()[0]}") from None


def context_length(config) -> int | None:
    """The most positions the model was built for (max_position_embeddings), or None if it does not say."""
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def resolve_length(value: int | None, default: int, config, what: str) -> int:
    """A token length: `default` capped at the model's context when not given; one beyond it is an error."""
    ctx = context_length(config)
    if value is None:
        return min(default, ctx) if ctx else default
    check_int(value, what, minimum=1)
    if ctx and value > ctx:
        raise MoepruneError(f"{what} {value} is beyond the model's context of {ctx} positions "
                            f"(max_position_embeddings); give at most {ctx}")
    return value


def check_int(value, what: str, minimum: int | None = None) -> int:
    """`value` must be an int (not a bool, not a float) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoepruneError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise MoepruneError(f"{what} must be >= {minimum}, got {value}")
    return value


def model_device(model) -> torch.device:
    """Where a model's parameters live; a clear error for a model without any."""
    for p in model.parameters():
        return p.device
    raise MoepruneError(f"{type(model).__name__} has no parameters: not a loaded model")


def load_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise MoepruneError(f"cannot load the config of {path}: {str(e).splitlines()[0]}") from e
