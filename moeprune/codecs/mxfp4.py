"""`mxfp4`: microscaled FP4 experts, as the GPT-OSS releases (`openai/gpt-oss-20b`, `-120b`) ship them.

`quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`. Only the
fused expert weights are quantized; everything else (attention, router, embeddings, the expert
biases) is plain BF16. A quantized weight `X` (e.g. `mlp.experts.gate_up_proj`) is not stored
under its own name but as two U8 tensors:

- `X_blocks` [E, out, in/32, 16]: 32 FP4 (e2m1) codes per group, two per byte, element 2i in the
  low nibble and 2i+1 in the high nibble;
- `X_scales` [E, out, in/32]: one E8M0 exponent per group, the group's scale being 2**(s - 127).

Decoded it is [E, out, in], which is transposed to the in-memory layout [E, in, out]
(`gate_up_proj` [E, H, 2I] with gate/up columns interleaved, `down_proj` [E, I, H]). The expert
is axis 0 of both, so an expert is a dim-0 row of its blocks and scales together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MoepruneError
from ..reader import CheckpointReader
from .base import Codec, _dtype_name

# the 16 values of an FP4 e2m1 code (sign bit 3, two exponent bits, one mantissa bit)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values sharing one scale
E8M0_BIAS = 127
E8M0_NAN = 255  # the one E8M0 code that is not a power of two


def blocks_key(key: str) -> str:
    return f"{key}_blocks"


def scales_key(key: str) -> str:
    return f"{key}_scales"


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of MXFP4 `blocks` [..., R, G, 16] with E8M0 `scales` [..., R, G], in the
    in-memory layout [..., G*32, R] (the stored rows become columns)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.int64)
    # element 2i of a group is the low nibble of byte i, 2i+1 its high nibble
    values = torch.stack((lut[codes & 0x0F], lut[codes >> 4]), dim=-1).flatten(-2)
    # ldexp multiplies by an exact power of two (a float 2**(s-127) could round for tiny s)
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1).float())
    return values.flatten(-2).transpose(-1, -2)


class Mxfp4Codec(Codec):
    name = "mxfp4"

    def describe(self) -> str:
        return "mxfp4 (FP4 e2m1 in groups of 32 with E8M0 scales)"

    def encoded(self, reader: CheckpointReader, key: str) -> bool:
        # a quantized weight exists only as its blocks and scales
        return key not in reader and blocks_key(key) in reader

    def stored(self, reader: CheckpointReader, key: str) -> bool:
        return key in reader or self.encoded(reader, key)

    def companions(self, reader: CheckpointReader, key: str) -> list[str]:
        return [blocks_key(key), scales_key(key)] if self.encoded(reader, key) else []

    def shape(self, reader: CheckpointReader, key: str) -> tuple[int, ...]:
        if not self.encoded(reader, key):
            return reader.shape(key)
        *lead, rows, groups, _ = reader.shape(blocks_key(key))
        return (*lead, groups * GROUP, rows)

    def check(self, reader: CheckpointReader, key: str, experts: int | None = None) -> None:
        if not self.encoded(reader, key):
            self._refuse_coded_float(reader, key, "; mxfp4 checkpoints hold FP4 weights as U8 _blocks/_scales pairs, "
                                                  "other tensors as plain floats")
            if blocks_key(key) in reader:
                raise MoepruneError(f"{reader.folder} holds both {key} and {blocks_key(key)}: inconsistent mxfp4 "
                                    f"checkpoint")
            super().check(reader, key, experts)
            return
        blocks, scales = blocks_key(key), scales_key(key)
        if scales not in reader:
            raise MoepruneError(f"mxfp4 weight {blocks} of {reader.folder} has no {scales}: cannot decode it")
        for k in (blocks, scales):
            if reader.dtype(k) != torch.uint8:
                raise MoepruneError(f"{k} of {reader.folder} is stored as {_dtype_name(reader.dtype(k))}; "
                                    f"mxfp4 blocks and scales are uint8")
        shape = reader.shape(blocks)
        if len(shape) < 3 or shape[-1] != GROUP // 2:
            raise MoepruneError(f"mxfp4 weight {blocks} of {reader.folder} has shape {list(shape)}; expected "
                                f"[..., rows, groups, {GROUP // 2}] (two FP4 codes a byte, {GROUP} a group)")
        if reader.shape(scales) != shape[:-1]:
            raise MoepruneError(f"{scales} of {reader.folder} has shape {list(reader.shape(scales))}; blocks of "
                                f"{list(shape)} need one scale a group: {list(shape[:-1])}")
        if experts is not None:
            self._check_experts(reader, [blocks, scales], experts)

    def read_into(self, reader: CheckpointReader, key: str, out: torch.Tensor,
                  rows: Sequence[int] | None = None) -> None:
        if not self.encoded(reader, key):
            super().read_into(reader, key, out, rows)
            return
        blocks_name, scales_name = blocks_key(key), scales_key(key)
        if rows is None:
            blocks, scales = reader.get(blocks_name), reader.get(scales_name)
        else:  # the expert is axis 0 of blocks and scales alike
            blocks, scales = reader.get_rows(blocks_name, rows), reader.get_rows(scales_name, rows)
        if bool((scales == E8M0_NAN).any()):
            raise MoepruneError(f"{scales_name} of {reader.folder} holds the E8M0 NaN code {E8M0_NAN}: "
                                f"refusing to decode NaN weights")
        if blocks.dim() == 3:
            out.copy_(dequantize_mxfp4(blocks, scales))
            return
        # one leading slice (an expert) at a time: the int64 codes and float32 values of a whole
        # layer would be many times its packed size
        for j in range(blocks.shape[0]):
            out[j].copy_(dequantize_mxfp4(blocks[j], scales[j]))


def from_config(config: dict, where: str) -> Mxfp4Codec:
    """The codec for a `quant_method: mxfp4` config."""
    return Mxfp4Codec(config)
