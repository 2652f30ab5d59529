"""`awq`: 4-bit AWQ Linears in AutoAWQ's GEMM layout, as the Qwen/Mixtral `-AWQ` releases ship
them, one set per expert.

`quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
"version": "gemm"}`. A quantized Linear weight `X.weight` [out, in] is stored as:

- `X.qweight` I32 [in, out/8]: eight 4-bit codes a word packed along the output, in AWQ's
  interleaved order: nibble k (bits 4k..) of word c holds output column 8c + [0, 2, 4, 6, 1, 3,
  5, 7][k], so column 8c + m is nibble [0, 4, 1, 5, 2, 6, 3, 7][m];
- `X.qzeros` I32 [groups, out/8]: zero points, packed the same way;
- `X.scales` F16 [groups, out].

The value of input row i, output j is (code - zero) * scale of group i // group_size (no offset,
unlike GPTQ). GEMV, exllama, Marlin and IPEX layouts, zero_point false and widths other than 4
are refused by name.
"""

from __future__ import annotations

import torch

from ..errors import MoepruneError
from ..reader import CheckpointReader
from .gptq import BITS, PACK, PackedInt4Codec, parse_group_size, unpack_int4

# nibble that holds output column m of each group of eight (the inverse of the packing order)
NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 codes [rows, cols*8] of AWQ-packed words [rows, cols], columns in their true order."""
    codes = unpack_int4(packed, 1)
    rows, cols = codes.shape
    order = torch.tensor(NIBBLE_OF_COLUMN)
    return codes.view(rows, cols // PACK, PACK)[..., order].reshape(rows, cols)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in] values of an AWQ GEMM Linear."""
    codes, zeros = unpack_awq(qweight), unpack_awq(qzeros)  # [in, out], [groups, out]
    inp = codes.shape[0]
    g = torch.arange(inp) // (inp if group_size == -1 else group_size)
    return ((codes - zeros[g]).float() * scales.float()[g]).t()


class AwqCodec(PackedInt4Codec):
    name = "awq"
    companion_names = ("qweight", "qzeros", "scales")
    optional = ()

    def describe(self) -> str:
        return f"awq gemm 4-bit in groups of {self.group_size}"

    def logical(self, qweight_shape: tuple[int, ...]) -> tuple[int, int]:
        return qweight_shape[1] * PACK, qweight_shape[0]

    def decode(self, reader: CheckpointReader, key: str) -> torch.Tensor:
        return dequantize_awq(reader.get(self._part(key, "qweight")), reader.get(self._part(key, "qzeros")),
                              reader.get(self._part(key, "scales")), self.group_size)


def from_config(config: dict, where: str) -> AwqCodec:
    """The codec for a `quant_method: awq` config; refuses the AWQ variants it does not decode."""
    bits = config.get("bits", config.get("w_bit"))
    if bits != BITS:
        raise MoepruneError(f"{where}: awq quantization with bits {bits!r} is not supported by moeprune "
                            f"(4-bit awq is)")
    version = config.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise MoepruneError(f"{where}: awq version {version!r} is not supported by moeprune (version 'gemm' is)")
    if config.get("zero_point", True) is not True:
        raise MoepruneError(f"{where}: awq with zero_point {config.get('zero_point')!r} is not supported by moeprune "
                            f"(zero_point true is)")
    return AwqCodec(config, parse_group_size(config, where, "awq", "group_size", "q_group_size"))
