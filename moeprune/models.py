"""Loading a transformers MoE model and its tokenizer from a folder (or the hub where it is reachable)."""

from __future__ import annotations

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
    """A local folder must exist and hold a config.json; anything else is treated as a hub id."""
    s = str(path)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MoepruneError(f"model path {s} is a file; give the checkpoint folder")
        if not (p / "config.json").is_file():
            raise MoepruneError(f"model folder {s} has no config.json: not a transformers checkpoint")
        return str(p)
    looks_local = s.startswith((".", "/", "~")) or s.count("/") != 1
    if looks_local:
        raise MoepruneError(f"model folder not found: {s}")
    return s


def load_model(path: str | os.PathLike, dtype=None, device: str = "cpu"):
    """(model, tokenizer) from a local folder or a hub id; a clear error when neither works."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .routers import get_adapter

    src = check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as e:
        raise MoepruneError(f"cannot load the config of {src}: {str(e).splitlines()[0]}") from None
    get_adapter(config)  # refuse dense or unsupported models before reading any weight
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=parse_dtype(dtype) or "auto")
    except Exception as e:
        raise MoepruneError(f"cannot load model {src}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, load_tokenizer(src)


def load_tokenizer(src: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise MoepruneError(f"cannot load a tokenizer from {src}: {str(e).splitlines()[0]}") from None
