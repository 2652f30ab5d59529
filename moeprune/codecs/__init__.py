"""Quantization codecs: one module per scheme, chosen from a checkpoint's config.

`codec_for_folder(folder)` reads `config.json`'s `quantization_config` (and `hf_quant_config.json`
where present; without a `quantization_config`, a root `quantize_config.json`, AutoGPTQ's old
layout, read as a GPTQ config) and returns the codec that decodes that scheme, or raises a one-line
`MoepruneError` naming a scheme moeprune does not implement: it never falls back to a cast.
Implemented: `none` (unquantized), `fp8_block` (quant_method fp8 with weight_block_size),
`fp8_tensor` (quant_method fp8 without it: AutoFP8's per-tensor FP8, static or dynamic activations;
decoded by the compressed-tensors float logic) and `mxfp4` (GPT-OSS fused expert `_blocks`/`_scales`),
`gptq` and `awq` (4-bit per-Linear `qweight`/`qzeros`/`scales`, GPTQ's `g_idx`),
`compressed_tensors` (pack-quantized int4/int8, float-quantized FP8 with static input scales).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MoepruneError
from . import awq, compressed_tensors, fp8_block, gptq, mxfp4
from .base import PLAIN_FLOATS, Codec
from .fp8_block import Fp8BlockCodec
from .fp8_tensor import Fp8TensorCodec
from .mxfp4 import Mxfp4Codec
from .none import NoneCodec

SUPPORTED = ("unquantized checkpoints, block FP8 (quant_method 'fp8' with weight_block_size), per-tensor "
             "FP8 (AutoFP8: quant_method 'fp8' without weight_block_size) and GPT-OSS MXFP4 (quant_method 'mxfp4'), 4-bit GPTQ (quant_method 'gptq') and 4-bit AWQ GEMM "
             "(quant_method 'awq'), compressed-tensors pack-quantized int4/int8 and float-quantized FP8")

# quant_method -> factory(quantization_config, where); anything else is refused by name
_FACTORIES = {"fp8": fp8_block.from_config, "mxfp4": mxfp4.from_config, "gptq": gptq.from_config,
              "awq": awq.from_config, "compressed-tensors": compressed_tensors.from_config}


def _refuse(where: str, scheme: str) -> MoepruneError:
    return MoepruneError(f"{where}: quantization {scheme} is not supported by moeprune yet (it reads {SUPPORTED}); "
                         f"use the model's unquantized (bf16) release")


def codec_for(quantization_config, hf_quant_config: dict | None = None, where: str = "checkpoint") -> Codec:
    """The codec for a `quantization_config` (dict, config object or None) and an optional
    `hf_quant_config.json` (NVIDIA ModelOpt) content."""
    if isinstance(hf_quant_config, dict):
        quant = hf_quant_config.get("quantization") or {}
        algo = quant.get("quant_algo") if isinstance(quant, dict) else quant
        if algo:
            raise _refuse(where, f"{algo!s} (hf_quant_config.json, NVIDIA ModelOpt)")
    qc = quantization_config
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else None
        if qc is None:
            raise MoepruneError(f"{where}: cannot read quantization_config {quantization_config!r}")
    if not qc:
        return NoneCodec()
    method = qc.get("quant_method")
    factory = _FACTORIES.get(str(method).lower()) if isinstance(method, str) else None
    if factory is None:
        raise _refuse(where, f"quant_method {method!r}")
    return factory(qc, where)


# AutoGPTQ's root file, from before transformers' quantization_config: read where config.json has none
LEGACY_GPTQ = "quantize_config.json"


def legacy_gptq_config(path: Path) -> dict:
    """A root `quantize_config.json` as a GPTQ quantization_config (`{"bits": 4, "group_size": 128,
    "desc_act": false, "sym": true, ...}`, often with no quant_method): AutoGPTQ wrote only GPTQ
    there, so a quant_method it names must be gptq."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MoepruneError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MoepruneError(f"{path} is not a JSON object: cannot read it as a GPTQ quantize_config")
    method = data.get("quant_method")
    if method is not None and (not isinstance(method, str) or method.lower() != "gptq"):
        raise MoepruneError(f"{path} declares quant_method {method!r}, and config.json has no quantization_config: "
                            f"moeprune reads a root quantize_config.json as AutoGPTQ's GPTQ config only")
    return {**data, "quant_method": "gptq"}


def codec_for_folder(folder: str | os.PathLike) -> Codec:
    """The codec of the checkpoint in `folder` (from its config.json and hf_quant_config.json, or from a
    root quantize_config.json where config.json has no quantization_config)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MoepruneError(f"cannot read {folder / 'config.json'}: {e}") from None
    if not isinstance(config, dict):
        raise MoepruneError(f"{folder / 'config.json'} is not a JSON object")
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    where = str(folder)
    if qc is None and (folder / LEGACY_GPTQ).is_file():
        qc, where = legacy_gptq_config(folder / LEGACY_GPTQ), str(folder / LEGACY_GPTQ)
    hf = None
    if (folder / "hf_quant_config.json").is_file():
        try:
            hf = json.loads((folder / "hf_quant_config.json").read_text())
        except (OSError, ValueError) as e:
            raise MoepruneError(f"cannot read {folder / 'hf_quant_config.json'}: {e}") from None
    return codec_for(qc, hf, where=where)


__all__ = ["LEGACY_GPTQ", "PLAIN_FLOATS", "SUPPORTED", "Codec", "Fp8BlockCodec", "Fp8TensorCodec", "Mxfp4Codec",
           "NoneCodec", "codec_for", "codec_for_folder", "legacy_gptq_config"]
