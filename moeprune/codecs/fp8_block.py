"""`fp8_block`: block-scaled FP8, as DeepSeek-V3/R1 and the Qwen3 `-FP8` releases ship it.

`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}`. A quantized weight `X.weight` [..., R, C] is stored as F8_E4M3
with a companion `X.weight_scale_inv` [..., ceil(R/b0), ceil(C/b1)] (F32 for DeepSeek, BF16 in
some Qwen releases: read from the header). Its value is code * scale of its block; the last
blocks of a shape that is not a multiple of the block (DeepSeek's 576-row kv_a_proj_with_mqa) are
cropped. A fused expert tensor (`experts.gate_up_proj`, `gate_up_proj_scale_inv`) carries the
expert on axis 0 of both. The block size comes from the config, never from the scale grid: a grid
only bounds it (576 rows over 5 scale rows is not a block of 115.2). `quant_method: fp8` without
`weight_block_size` (AutoFP8's per-tensor FP8) is decoded by `fp8_tensor`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import MoepruneError
from ..reader import CheckpointReader
from . import fp8_tensor
from .base import Codec, _dtype_name

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scale_key(key: str) -> str:
    """The `weight_scale_inv` companion of weight `key` (per-Linear or fused experts naming)."""
    return f"{key}_scale_inv"


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Values of an FP8 `weight` [..., R, C] whose [b0, b1] blocks are scaled by `scale_inv`, into
    `out` (default: a new float32 tensor). Each code is exact in any float dtype, so it is cast
    first and scaled in place, in float32, rounded once: no float32 copy of the weight is made."""
    b0, b1 = block
    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    out.copy_(weight)
    scale = scale_inv.float()
    rows, cols = weight.shape[-2:]
    whole_c = cols // b1
    flat, grid = out.view(-1, rows, cols), scale.reshape(-1, *scale.shape[-2:])
    # one block row at a time: scaling a float16/bfloat16 `out` by float32 scales computes through a
    # float32 temporary of the region, which stays a block row (whole tensors left the allocator holding
    # freed temporaries in every reading thread); edge blocks (DeepSeek's 576 rows) are cropped
    for m in range(flat.shape[0]):
        for i in range(grid.shape[-2]):
            band, s = flat[m, i * b0:(i + 1) * b0], grid[m, i]
            if whole_c:
                band[:, :whole_c * b1].unflatten(-1, (whole_c, b1)).mul_(s[:whole_c, None])
            if whole_c * b1 < cols:
                band[:, whole_c * b1:].mul_(s[whole_c])
    return out


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
        dequantize_fp8_block(weight, scale_inv, self.block, out=out)


def from_config(config: dict, where: str) -> Codec:
    """The codec for a `quant_method: fp8` config: block FP8 with `weight_block_size`, else AutoFP8's
    per-tensor FP8 (`fp8_tensor`); refuses the FP8 variants it does not decode."""
    fmt = str(config.get("fmt") or "e4m3").lower()
    if fmt != "e4m3":
        raise MoepruneError(f"{where}: fp8 quantization with fmt {fmt!r} is not supported by moeprune "
                            f"(fmt e4m3 is)")
    if config.get("weight_block_size") is None:
        return fp8_tensor.from_config(config, where)
    scheme = str(config.get("activation_scheme") or "dynamic").lower()
    if scheme != "dynamic":
        raise MoepruneError(f"{where}: block fp8 quantization with activation_scheme {scheme!r} (static input "
                            f"scales) is not supported by moeprune yet; dynamic activations are")
    return Fp8BlockCodec(config, where)
