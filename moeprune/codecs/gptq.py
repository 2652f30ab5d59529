"""`gptq`: 4-bit GPTQ Linears (AutoGPTQ / GPTQModel / optimum format), as the Mixtral and Qwen
`-GPTQ-Int4` releases ship them, one set per expert.

`quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
"sym": true, "checkpoint_format": "gptq"}`. A quantized Linear weight `X.weight` [out, in] is not
stored under its own name but as:

- `X.qweight` I32 [in/8, out]: eight 4-bit codes a word, packed along the input: input row
  8r+k of column j is bits 4k..4k+3 of `qweight[r, j]`;
- `X.qzeros` I32 [groups, out/8]: zero points packed along the output the same way;
- `X.scales` F16 [groups, out];
- `X.g_idx` I32 [in]: the group of each input row (arbitrary with `desc_act`; absent in some
  old checkpoints, then row i is in group i // group_size).

The value of input row i, output j is (code - (zero + 1)) * scale of group g_idx[i]: the
`checkpoint_format: gptq` (v1) layout stores each zero point minus one, a historical offset the
GPTQ/exllama/Marlin kernels of vLLM and GPTQModel add back. GPTQModel's internal `gptq_v2` (no
offset), Marlin/BitBLAS repacks and widths other than 4 are refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MoepruneError
from ..reader import CheckpointReader
from .base import Codec, _dtype_name

BITS = 4
PACK = 32 // BITS  # codes a 32-bit word
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMPANIONS = ("qweight", "qzeros", "scales", "g_idx")


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 codes 0..15 of `packed` int32 words, each word opened into eight codes along `dim`
    (nibble k, bits 4k.., becomes element 8r+k), lowest nibble first."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    dim = dim % packed.dim()
    words = packed.to(torch.int32).unsqueeze(dim + 1)
    view = [1] * words.dim()
    view[dim + 1] = PACK
    # `& 0xF` also undoes the sign extension of an arithmetic shift of a negative word
    codes = (words >> shifts.view(view)) & 0xF
    return codes.flatten(dim, dim + 1)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, zero_offset: int = 1) -> torch.Tensor:
    """float32 [out, in] values of a GPTQ Linear (`zero_offset` 1: the v1 `gptq` format)."""
    codes = unpack_int4(qweight, 0)  # [in, out]
    zeros = unpack_int4(qzeros, 1) + zero_offset  # [groups, out]
    g = g_idx.long()
    values = (codes - zeros[g]).float() * scales.float()[g]
    return values.t()


def base_key(key: str) -> str | None:
    """`X` of a weight key `X.weight`; None for a key that is not a Linear weight."""
    return key[: -len(".weight")] if key.endswith(".weight") else None


class PackedInt4Codec(Codec):
    """Shared by GPTQ and AWQ: a weight stored only as `qweight`/`qzeros`/`scales` (+ `g_idx`)."""

    companion_names: tuple[str, ...] = COMPANIONS
    optional: tuple[str, ...] = ("g_idx",)

    def __init__(self, config: dict, group_size: int):
        super().__init__(config)
        self.group_size = group_size

    def _part(self, key: str, part: str) -> str:
        return f"{base_key(key)}.{part}"

    def encoded(self, reader: CheckpointReader, key: str) -> bool:
        return key not in reader and base_key(key) is not None and self._part(key, "qweight") in reader

    def stored(self, reader: CheckpointReader, key: str) -> bool:
        return key in reader or self.encoded(reader, key)

    def companions(self, reader: CheckpointReader, key: str) -> list[str]:
        if not self.encoded(reader, key):
            return []
        return [k for k in (self._part(key, p) for p in self.companion_names) if k in reader]

    def logical(self, qweight_shape: tuple[int, ...]) -> tuple[int, int]:
        """(out, in) of a weight whose qweight has `qweight_shape`."""
        raise NotImplementedError

    def check(self, reader: CheckpointReader, key: str, experts: int | None = None) -> None:
        if not self.encoded(reader, key):
            self._refuse_coded_float(reader, key, f"; {self.name} checkpoints hold 4-bit weights as int32 "
                                                  f"qweight/qzeros, other tensors as floats")
            super().check(reader, key, experts)
            return
        if experts is not None:  # no GPTQ/AWQ release fuses experts; slicing packed rows would be a guess
            raise MoepruneError(f"{self._part(key, 'qweight')} of {reader.folder} is a {self.name} weight fused over "
                                f"experts: moeprune reads {self.name} experts stored one per expert only")
        names = {p: self._part(key, p) for p in self.companion_names}
        for p, k in names.items():
            if k not in reader and p not in self.optional:
                raise MoepruneError(f"{self.name} weight {names['qweight']} of {reader.folder} has no {k}: "
                                    f"cannot decode it")
        for p in ("qweight", "qzeros", "g_idx"):
            if names.get(p) in reader and reader.dtype(names[p]) != torch.int32:
                raise MoepruneError(f"{names[p]} of {reader.folder} is stored as {_dtype_name(reader.dtype(names[p]))}; "
                                    f"{self.name} {p} is int32")
        if reader.dtype(names["scales"]) not in SCALE_DTYPES:
            raise MoepruneError(f"{names['scales']} of {reader.folder} is stored as "
                                f"{_dtype_name(reader.dtype(names['scales']))}; {self.name} scales are floats")
        qshape = tuple(reader.shape(names["qweight"]))
        if len(qshape) != 2:
            raise MoepruneError(f"{names['qweight']} of {reader.folder} has shape {list(qshape)}: not a matrix")
        out, inp = self.logical(qshape)
        want_groups = 1 if self.group_size == -1 else -(-inp // self.group_size)
        expect = {"scales": (want_groups, out), "qzeros": (want_groups, out // PACK)}
        if "g_idx" in names and names["g_idx"] in reader:
            expect["g_idx"] = (inp,)
        for p, shape in expect.items():
            if tuple(reader.shape(names[p])) != shape:
                raise MoepruneError(f"{names[p]} of {reader.folder} has shape {list(reader.shape(names[p]))}; a "
                                    f"{self.name} weight [{out}, {inp}] in groups of {self.group_size} "
                                    f"(group_size) needs {list(shape)}")

    def shape(self, reader: CheckpointReader, key: str) -> tuple[int, ...]:
        if not self.encoded(reader, key):
            return reader.shape(key)
        return self.logical(tuple(reader.shape(self._part(key, "qweight"))))

    def groups_of(self, reader: CheckpointReader, key: str, inp: int) -> torch.Tensor:
        """The group of each input row: `g_idx` where stored (checked), else row // group_size."""
        name = self._part(key, "g_idx")
        groups = reader.shape(self._part(key, "scales"))[0]
        if name in reader:
            g = reader.get(name)
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
                raise MoepruneError(f"{name} of {reader.folder} names groups {int(g.min())}..{int(g.max())}, "
                                    f"but its scales hold {groups}")
            return g
        size = inp if self.group_size == -1 else self.group_size
        return torch.arange(inp, dtype=torch.int32) // size

    def decode(self, reader: CheckpointReader, key: str) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, reader: CheckpointReader, key: str, out: torch.Tensor,
                  rows: Sequence[int] | None = None) -> None:
        if not self.encoded(reader, key):
            super().read_into(reader, key, out, rows)
            return
        if rows is not None:
            raise MoepruneError(f"{self._part(key, 'qweight')} of {reader.folder}: {self.name} experts fused over "
                                f"experts are not supported")
        out.copy_(self.decode(reader, key))


class GptqCodec(PackedInt4Codec):
    name = "gptq"

    def __init__(self, config: dict, group_size: int, desc_act: bool):
        super().__init__(config, group_size)
        self.desc_act = desc_act

    def describe(self) -> str:
        order = ", desc_act" if self.desc_act else ""
        return f"gptq 4-bit in groups of {self.group_size}{order}"

    def logical(self, qweight_shape: tuple[int, ...]) -> tuple[int, int]:
        return qweight_shape[1], qweight_shape[0] * PACK

    def check(self, reader: CheckpointReader, key: str, experts: int | None = None) -> None:
        super().check(reader, key, experts)
        if self.encoded(reader, key) and self.desc_act and self._part(key, "g_idx") not in reader:
            # with act-order the rows' groups are a permutation only g_idx records
            raise MoepruneError(f"{self._part(key, 'qweight')} of {reader.folder} has no g_idx, but desc_act is "
                                f"true: the group of each input row is unknown")

    def decode(self, reader: CheckpointReader, key: str) -> torch.Tensor:
        qweight = reader.get(self._part(key, "qweight"))
        inp = qweight.shape[0] * PACK
        return dequantize_gptq(qweight, reader.get(self._part(key, "qzeros")), reader.get(self._part(key, "scales")),
                               self.groups_of(reader, key, inp))


def parse_group_size(config: dict, where: str, scheme: str, *names: str) -> int:
    """The group size of a config (-1: one group over the whole input)."""
    size = next((config[n] for n in names if n in config), None)
    if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1) or (size > 0 and size % PACK):
        raise MoepruneError(f"{where}: {scheme} quantization_config {names[0]} must be -1 or a positive multiple of "
                            f"{PACK}, got {size!r}")
    return size


def from_config(config: dict, where: str) -> GptqCodec:
    """The codec for a `quant_method: gptq` config; refuses the GPTQ variants it does not decode."""
    bits = config.get("bits")
    if bits != BITS:
        raise MoepruneError(f"{where}: gptq quantization with bits {bits!r} is not supported by moeprune "
                            f"(4-bit gptq is)")
    fmt = config.get("checkpoint_format", "gptq")
    fmt = "gptq" if fmt is None else fmt
    if config.get("is_marlin_format"):
        fmt = "marlin"
    if str(fmt).lower() != "gptq":
        raise MoepruneError(f"{where}: gptq checkpoint_format {fmt!r} is not supported by moeprune (the 'gptq' "
                            f"format, zero points stored minus one, is)")
    desc_act = config.get("desc_act", False)
    if not isinstance(desc_act, bool):
        raise MoepruneError(f"{where}: gptq quantization_config desc_act must be true or false, got {desc_act!r}")
    return GptqCodec(config, parse_group_size(config, where, "gptq", "group_size"), desc_act)
