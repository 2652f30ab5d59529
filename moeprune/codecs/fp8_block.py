"""`fp8_block`: block-scaled FP8, as DeepSeek-V3/R1 and the Qwen3 `-FP8` releases ship it.

`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}`. A quantized weight `X.weight` [..., R, C] is stored as F8_E4M3
with a companion `X.weight_scale_inv` [..., ceil(R/b0), ceil(C/b1)] (F32 for DeepSeek, BF16 in
some Qwen releases: read from the header). Its value is code * scale of its block; the last
blocks of a shape that is not a multiple of the block (DeepSeek's 576-row kv_a_proj_with_mqa) are
cropped. A fused expert tensor (`experts.gate_up_proj`, `gate_up_proj_scale_inv`) carries the
expert on axis 0 of both. The block size comes from the config, never from the scale grid: a grid
only bounds it (576 rows over 5 scale rows is not a block of 115.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import MoepruneError
from ..reader import CheckpointReader
from .base import Codec, _dtype_name

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scale_key(key: str) -> str:
    """The `weight_scale_inv` companion of weight `key` (per-Linear or fused experts naming)."""
    return f"{key}_scale_inv"


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 values of an FP8 `weight` [..., R, C] whose [b0, b1] blocks are scaled by `scale_inv`."""
    b0, b1 = block
    *lead, rows, cols = weight.shape
    gr, gc = math.ceil(rows / b0), math.ceil(cols / b1)
    w = weight.float()
    if (rows, cols) != (gr * b0, gc * b1):  # pad to whole blocks, multiply, crop back
        w = F.pad(w, (0, gc * b1 - cols, 0, gr * b0 - rows))
    w = w.view(*lead, gr, b0, gc, b1)
    w.mul_(scale_inv.float().reshape(*lead, gr, 1, gc, 1))
    return w.view(*lead, gr * b0, gc * b1)[..., :rows, :cols]


class Fp8BlockCodec(Codec):
    name = "fp8_block"

    def __init__(self, config: dict, where: str = ""):
        super().__init__(config)
        block = config.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise MoepruneError(f"{where}: quantization_config weight_block_size must be two positive integers, "
                                f"got {block!r}")
        self.block = (int(block[0]), int(block[1]))

    def describe(self) -> str:
        return f"fp8 e4m3 with {self.block[0]}x{self.block[1]} blocks"

    def encoded(self, reader: CheckpointReader, key: str) -> bool:
        return reader.dtype(key) == torch.float8_e4m3fn

    def companions(self, reader: CheckpointReader, key: str) -> list[str]:
        return [scale_key(key)] if self.encoded(reader, key) else []

    def check(self, reader: CheckpointReader, key: str, experts: int | None = None) -> None:
        dtype, scale = reader.dtype(key), scale_key(key)
        if not self.encoded(reader, key):
            self._refuse_coded_float(reader, key, "; block FP8 checkpoints hold float8_e4m3fn weights (fmt e4m3) only")
            if scale in reader:
                raise MoepruneError(f"{scale} of {reader.folder} scales {key}, which is stored as "
                                    f"{_dtype_name(dtype)}, not FP8: inconsistent checkpoint")
            super().check(reader, key, experts)
            return
        if scale not in reader:
            raise MoepruneError(f"FP8 weight {key} of {reader.folder} has no {scale}: cannot decode it")
        if reader.dtype(scale) not in SCALE_DTYPES:
            raise MoepruneError(f"{scale} of {reader.folder} is stored as {_dtype_name(reader.dtype(scale))}; "
                                f"moeprune reads FP8 block scales stored as float32, bfloat16 or float16")
        shape = reader.shape(key)
        if len(shape) < 2:
            raise MoepruneError(f"FP8 weight {key} of {reader.folder} has shape {list(shape)}: not a matrix")
        b0, b1 = self.block
        want = (*shape[:-2], math.ceil(shape[-2] / b0), math.ceil(shape[-1] / b1))
        if reader.shape(scale) != want:
            raise MoepruneError(f"{scale} of {reader.folder} has shape {list(reader.shape(scale))}; a weight of "
                                f"{list(shape)} in {b0}x{b1} blocks (weight_block_size) needs {list(want)}")
        if experts is not None:
            self._check_experts(reader, [key, scale], experts)

    def read_into(self, reader: CheckpointReader, key: str, out: torch.Tensor,
                  rows: Sequence[int] | None = None) -> None:
        if not self.encoded(reader, key):
            super().read_into(reader, key, out, rows)
            return
        scale = scale_key(key)
        if rows is None:
            weight, scale_inv = reader.get(key), reader.get(scale)
        else:  # the expert is axis 0 of the weight and of its scale grid
            weight, scale_inv = reader.get_rows(key, rows), reader.get_rows(scale, rows)
        out.copy_(dequantize_fp8_block(weight, scale_inv, self.block))


def from_config(config: dict, where: str) -> Fp8BlockCodec:
    """The codec for a `quant_method: fp8` config; refuses the FP8 variants it does not decode."""
    fmt = str(config.get("fmt") or "e4m3").lower()
    if fmt != "e4m3":
        raise MoepruneError(f"{where}: fp8 quantization with fmt {fmt!r} is not supported by moeprune "
                            f"(block FP8 with fmt e4m3 is)")
    if config.get("weight_block_size") is None:
        raise MoepruneError(f"{where}: fp8 quantization without weight_block_size (per-tensor or per-channel "
                            f"scales) is not supported by moeprune yet; block FP8 (weight_block_size) is")
    scheme = str(config.get("activation_scheme") or "dynamic").lower()
    if scheme != "dynamic":
        raise MoepruneError(f"{where}: fp8 quantization with activation_scheme {scheme!r} (static input scales) "
                            f"is not supported by moeprune yet; dynamic activations are")
    return Fp8BlockCodec(config, where)
