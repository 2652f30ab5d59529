"""`compressed_tensors`: llm-compressor / RedHatAI checkpoints (`quant_method: compressed-tensors`).

Two formats, the common ones for MoE releases:

- `pack-quantized` (W4A16, W8A16): a quantized Linear `X.weight` is not stored under its own name
  but as `X.weight_packed` I32 [out, ceil(in*bits/32)] (value + 2**(bits-1), unsigned; column
  `p*j + i` sits in bits [bits*i, bits*(i+1)) of word j, p = 32/bits values a word),
  `X.weight_scale` [out, groups] (float), `X.weight_shape` [2] = [out, in], and optionally
  `X.weight_zero_point` I32 [ceil(out*bits/32), groups] (asymmetric; packed the same way but
  along dim 0) and `X.weight_g_idx` I32 [in] (activation ordering: column c belongs to group
  g_idx[c] instead of c // group_size). Value = (q - zero_point) * scale of the column's group.
- `float-quantized` (FP8): `X.weight` F8_E4M3 [out, in] with `X.weight_scale` [out, 1] (channel
  strategy) or [] / [1] (tensor strategy); with static activations, `X.input_scale` [] / [1].

Per-expert keys (`...experts.E.gate_proj.weight_packed`) are the usual MoE layout; tensors fused
over experts are refused. Export copies every companion byte for byte, except a static
`input_scale` of an expert: vLLM serves a layer with the max of its experts' input scales, so
each kept expert gets the original layer's max and the served numerics do not change with pruning.
Anything else compressed-tensors can describe (other formats, sparsity, transforms, KV-cache or
output quantization, mixed schemes) is refused in one line naming it. AutoFP8's per-tensor FP8
(`fp8_tensor`) stores the keys of the float-quantized "tensor" strategy and is decoded by this class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import MoepruneError
from ..reader import CheckpointReader
from .base import PLAIN_FLOATS, Codec, _dtype_name

PACKED = "pack-quantized"
FLOAT = "float-quantized"
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SHAPE_DTYPES = (torch.int32, torch.int64)


def _companion(key: str, suffix: str) -> str:
    """`X.weight` -> `X.weight_<suffix>` (weight companions) or `X.<suffix>` for `input_scale`."""
    if suffix == "input_scale":
        return key[: -len("weight")] + "input_scale" if key.endswith("weight") else f"{key}.input_scale"
    return f"{key}_{suffix}"


def _unpack_last(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes of int32 words [..., W] packed along the last dim: [..., W * 32/bits]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    # int64 so the shift never sees the sign bit of a word whose top code is >= 8
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)  # word j, slot i -> column per_word*j + i


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], bits: int,
                      group_size: int | None, zero_point: torch.Tensor | None = None,
                      g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values [out, in] of a pack-quantized weight. `group_size` None: one group a row."""
    rows, cols = shape
    offset = 1 << (bits - 1)
    q = _unpack_last(packed, bits)[:, :cols] - offset  # drop the padding of the last word
    if g_idx is not None:
        groups = g_idx.to(torch.int64)
    elif group_size is None:
        groups = torch.zeros(cols, dtype=torch.int64)
    else:
        groups = torch.arange(cols, dtype=torch.int64) // group_size
    if zero_point is not None:
        # packed along dim 0: unpack the transposed words, then take the rows back
        zp = _unpack_last(zero_point.t(), bits).t()[:rows] - offset
        q = q - zp.index_select(1, groups)
    return q.float() * scale.float().index_select(1, groups)


class CompressedTensorsCodec(Codec):
    name = "compressed_tensors"
    # how messages name the scheme (a codec that reuses this decoding, e.g. fp8_tensor, names its own)
    scheme = "compressed-tensors"

    def __init__(self, config: dict, fmt: str, weights: dict, static_input: bool):
        super().__init__(config)
        self.format = fmt
        self.bits = int(weights.get("num_bits") or 0)
        self.strategy = str(weights.get("strategy") or "").lower()
        self.symmetric = bool(weights.get("symmetric", True))
        self.group_size = int(weights["group_size"]) if self.strategy == "group" else None
        self.actorder = weights.get("actorder")
        self.static_input = static_input

    def describe(self) -> str:
        if self.format == PACKED:
            how = f"group {self.group_size}" if self.group_size else self.strategy
            return (f"compressed-tensors {PACKED} int{self.bits} ({how}, "
                    f"{'symmetric' if self.symmetric else 'asymmetric'})")
        return f"compressed-tensors {FLOAT} fp8 e4m3 ({self.strategy} scales" + \
            (", static input_scale)" if self.static_input else ")")

    # ---------------------------------------------------------------- header only
    def encoded(self, reader: CheckpointReader, key: str) -> bool:
        if self.format == PACKED:
            return key not in reader and _companion(key, "packed") in reader
        return key in reader and reader.dtype(key) == torch.float8_e4m3fn

    def stored(self, reader: CheckpointReader, key: str) -> bool:
        return key in reader or self.encoded(reader, key)

    def companions(self, reader: CheckpointReader, key: str) -> list[str]:
        if not self.encoded(reader, key):
            return []
        names = ("packed", "scale", "shape", "zero_point", "g_idx") if self.format == PACKED else \
            ("scale", "input_scale")
        return [c for c in (_companion(key, n) for n in names) if c in reader]

    def shape(self, reader: CheckpointReader, key: str) -> tuple[int, ...]:
        if self.format != PACKED or not self.encoded(reader, key):
            return reader.shape(key)
        return tuple(int(v) for v in reader.get(_companion(key, "shape")).tolist())

    def check(self, reader: CheckpointReader, key: str, experts: int | None = None) -> None:
        where = reader.folder
        if not self.encoded(reader, key):
            self._refuse_coded_float(reader, key, f"; {self.describe()} stores quantized weights as "
                                                  f"{'weight_packed int32' if self.format == PACKED else 'float8_e4m3fn'}")
            stray = [c for c in (_companion(key, n) for n in ("packed", "scale", "zero_point", "g_idx", "shape"))
                     if c in reader]
            if stray:
                raise MoepruneError(f"{where} holds {stray[0]} next to {key} stored as {_dtype_name(reader.dtype(key))}: "
                                    f"inconsistent {self.scheme} checkpoint")
            super().check(reader, key, experts)
            return
        if experts is not None:
            raise MoepruneError(f"{key} of {where}: {self.scheme} weights fused over experts are not supported "
                                f"by moeprune yet (per-expert keys are)")
        if self.format == PACKED:
            self._check_packed(reader, key)
        else:
            self._check_float(reader, key)

    def _need(self, reader: CheckpointReader, key: str, suffix: str, dtypes: tuple[torch.dtype, ...]) -> str:
        name = _companion(key, suffix)
        if name not in reader:
            raise MoepruneError(f"quantized weight {key} of {reader.folder} has no {name}: cannot decode it")
        if reader.dtype(name) not in dtypes:
            raise MoepruneError(f"{name} of {reader.folder} is stored as {_dtype_name(reader.dtype(name))}; "
                                f"expected {' or '.join(_dtype_name(d) for d in dtypes)}")
        return name

    def _bad_shape(self, reader: CheckpointReader, name: str, want: tuple[int, ...], why: str) -> MoepruneError:
        return MoepruneError(f"{name} of {reader.folder} has shape {list(reader.shape(name))}; {why} needs {list(want)}")

    def _check_packed(self, reader: CheckpointReader, key: str) -> None:
        packed = self._need(reader, key, "packed", (torch.int32,))
        scale = self._need(reader, key, "scale", SCALE_DTYPES)
        shape_key = self._need(reader, key, "shape", _SHAPE_DTYPES)
        if reader.shape(shape_key) != (2,):
            raise self._bad_shape(reader, shape_key, (2,), "a Linear's [out, in]")
        rows, cols = self.shape(reader, key)
        per_word = 32 // self.bits
        want = (rows, -(-cols // per_word))
        if reader.shape(packed) != want:
            raise self._bad_shape(reader, packed, want, f"a weight of {[rows, cols]} at {self.bits} bits")
        groups = -(-cols // self.group_size) if self.group_size else 1
        if reader.shape(scale) != (rows, groups):
            raise self._bad_shape(reader, scale, (rows, groups), f"{[rows, cols]} in groups of "
                                  f"{self.group_size or cols} (config_groups weights)")
        zp = _companion(key, "zero_point")
        if self.symmetric and zp in reader:
            raise MoepruneError(f"{reader.folder} holds {zp} but its config_groups weights are symmetric: "
                                f"inconsistent {self.scheme} checkpoint")
        if not self.symmetric:
            self._need(reader, key, "zero_point", (torch.int32,))
            want = (-(-rows // per_word), groups)
            if reader.shape(zp) != want:
                raise self._bad_shape(reader, zp, want, f"zero points of {[rows, groups]} packed along dim 0")
        g_idx = _companion(key, "g_idx")
        if self.actorder == "group" and g_idx not in reader:
            raise MoepruneError(f"quantized weight {key} of {reader.folder} has no {g_idx} but the config's "
                                f"actorder is 'group': cannot decode it")
        if g_idx in reader:
            self._need(reader, key, "g_idx", (torch.int32, torch.int64))
            if reader.shape(g_idx) != (cols,):
                raise self._bad_shape(reader, g_idx, (cols,), "one group index a column")
        if _companion(key, "input_scale") in reader:
            raise MoepruneError(f"{reader.folder} holds {_companion(key, 'input_scale')}: activation quantization "
                                f"with {PACKED} weights is not supported by moeprune")

    def _check_float(self, reader: CheckpointReader, key: str) -> None:
        scale = self._need(reader, key, "scale", SCALE_DTYPES)
        shape = reader.shape(key)
        if len(shape) != 2:
            raise MoepruneError(f"FP8 weight {key} of {reader.folder} has shape {list(shape)}: not a matrix")
        if self.strategy == "channel":
            if reader.shape(scale) not in ((shape[0], 1), (shape[0],)):
                raise self._bad_shape(reader, scale, (shape[0], 1), "a per-channel scale")
        elif reader.shape(scale) not in ((), (1,)):
            raise self._bad_shape(reader, scale, (), "a per-tensor scale")
        inp = _companion(key, "input_scale")
        if self.static_input:
            self._need(reader, key, "input_scale", SCALE_DTYPES)
            if reader.shape(inp) not in ((), (1,)):
                raise self._bad_shape(reader, inp, (), "a static per-tensor input scale")
        elif inp in reader:
            raise MoepruneError(f"{reader.folder} holds {inp} but the config's input activations are dynamic: "
                                f"inconsistent {self.scheme} checkpoint")

    # ---------------------------------------------------------------- data
    def buffer_dtype(self, reader: CheckpointReader, key: str, target: torch.dtype) -> torch.dtype:
        # a plain float weight (an `ignore`d Linear, even an expert's) decodes into the same buffer
        # as its quantized neighbours, so it takes their dtype too
        if self.encoded(reader, key) or (target.is_floating_point and reader.dtype(key) in PLAIN_FLOATS):
            return target
        return reader.dtype(key)

    def read_into(self, reader: CheckpointReader, key: str, out: torch.Tensor,
                  rows: Sequence[int] | None = None) -> None:
        if rows is not None and self.encoded(reader, key):  # check() refuses fused quantized weights
            raise MoepruneError(f"{key} of {reader.folder}: {self.scheme} weights fused over experts are "
                                f"not supported by moeprune yet")
        if not self.encoded(reader, key):
            if out.dtype == reader.dtype(key):
                super().read_into(reader, key, out, rows)
            else:
                out.copy_(reader.get(key) if rows is None else reader.get_rows(key, rows))
            return
        if self.format == FLOAT:
            weight, scale = reader.get(key), reader.get(_companion(key, "scale"))
            scale = scale.float().reshape(-1, 1) if self.strategy == "channel" else scale.float().reshape(())
            out.copy_(weight.float() * scale)
            return
        shape = self.shape(reader, key)
        zp = _companion(key, "zero_point")
        g_name = _companion(key, "g_idx")
        g_idx = reader.get(g_name) if g_name in reader else None
        scale = reader.get(_companion(key, "scale"))
        if g_idx is not None and bool(((g_idx < 0) | (g_idx >= scale.shape[1])).any()):
            raise MoepruneError(f"{g_name} of {reader.folder} names groups outside 0..{scale.shape[1] - 1}")
        out.copy_(dequantize_packed(reader.get(_companion(key, "packed")), scale, shape, self.bits,
                                    self.group_size, reader.get(zp) if zp in reader else None, g_idx))

    def export_tensor(self, reader: CheckpointReader, key: str,
                      siblings: Sequence[str]) -> Callable[[], torch.Tensor] | None:
        """A static `input_scale` of a kept expert is written as the max over all of the layer's
        experts (`siblings`: this projection's input_scale in every expert, pruned ones too):
        vLLM serves the layer with that max, so the export serves the same numerics."""
        if not (self.static_input and key.endswith(".input_scale")):
            return None
        for s in siblings:
            if reader.shape(s) != reader.shape(key) or reader.dtype(s) != reader.dtype(key):
                raise MoepruneError(f"{s} of {reader.folder} is {list(reader.shape(s))} "
                                    f"{_dtype_name(reader.dtype(s))}, unlike {key}: cannot take the layer's max")

        def layer_max() -> torch.Tensor:
            values = torch.stack([reader.get(s) for s in siblings])
            return values.amax(dim=0).contiguous()  # max of stored values: exact, same dtype and shape

        return layer_max

    def export_note(self) -> str:
        if not self.static_input:
            return ""
        return ("Static activation scales: every kept expert's `input_scale` holds the largest input_scale of "
                "its layer's experts in the source (per projection), so vLLM, which serves a layer with that "
                "max, quantizes activations exactly as it did for the unpruned model.")


def _refuse(where: str, what: str) -> MoepruneError:
    return MoepruneError(f"{where}: compressed-tensors {what} is not supported by moeprune yet (it reads "
                         f"{PACKED} int4/int8 and {FLOAT} fp8 with channel or tensor scales)")


def _same(groups: list[dict], field: str):
    """The one value every config group gives `field`; refuses mixed schemes."""
    values = [g.get(field) for g in groups]
    if any(v != values[0] for v in values):
        raise MoepruneError(f"compressed-tensors config_groups with different {field} (a mixed-precision scheme) "
                            f"are not supported by moeprune yet")
    return values[0]


def from_config(config: dict, where: str) -> CompressedTensorsCodec:
    """The codec for a `quant_method: compressed-tensors` config; refuses what it does not decode."""
    status = config.get("quantization_status")
    if status not in (None, "compressed"):
        raise _refuse(where, f"quantization_status {status!r} (weights not stored compressed)")
    for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if config.get(field):
            what = {"sparsity_config": "sparsity (e.g. 2:4)", "transform_config": "transforms (rotations)",
                    "kv_cache_scheme": "KV-cache quantization"}[field]
            raise _refuse(where, f"{what} ({field})")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise MoepruneError(f"{where}: compressed-tensors quantization_config has no config_groups: "
                            f"cannot tell how its weights are stored")
    groups_list = list(groups.values())
    top = config.get("format")
    fmt = _same(groups_list, "format") or top
    if top is not None and top not in ("mixed-precision", fmt):
        raise _refuse(where, f"format {top!r} with config_groups format {fmt!r}")
    weights = _same(groups_list, "weights")
    inputs = _same(groups_list, "input_activations")
    if _same(groups_list, "output_activations"):
        raise _refuse(where, "output activation quantization (output_activations)")
    if fmt not in (PACKED, FLOAT):
        raise _refuse(where, f"format {fmt!r}")
    if not isinstance(weights, dict):
        raise _refuse(where, f"format {fmt!r} without weights quantization")
    wtype, bits, strategy = weights.get("type"), weights.get("num_bits"), str(weights.get("strategy") or "").lower()
    if weights.get("dynamic"):
        raise _refuse(where, "dynamic weight quantization")
    if fmt == PACKED:
        if wtype != "int" or bits not in (4, 8):
            raise _refuse(where, f"{PACKED} {wtype} weights of {bits} bits")
        if strategy not in ("group", "channel"):
            raise _refuse(where, f"{PACKED} with strategy {strategy!r}")
        if strategy == "group" and not (isinstance(weights.get("group_size"), int) and weights["group_size"] > 0):
            raise MoepruneError(f"{where}: compressed-tensors group strategy needs a positive group_size, "
                                f"got {weights.get('group_size')!r}")
        if weights.get("actorder") not in (None, "group", "weight", "static"):
            raise _refuse(where, f"actorder {weights.get('actorder')!r}")
        if inputs:
            raise _refuse(where, f"{PACKED} weights with quantized input_activations")
        return CompressedTensorsCodec(config, fmt, weights, static_input=False)
    if wtype != "float" or bits != 8:
        raise _refuse(where, f"{FLOAT} {wtype} weights of {bits} bits (fp8 e4m3 is supported)")
    if strategy not in ("channel", "tensor"):
        raise _refuse(where, f"{FLOAT} with strategy {strategy!r} (e.g. block FP8)")
    static = False
    if inputs:
        if not isinstance(inputs, dict) or inputs.get("type") != "float" or inputs.get("num_bits") != 8:
            raise _refuse(where, f"input_activations {inputs!r}")
        static = not inputs.get("dynamic")
        if static and str(inputs.get("strategy") or "").lower() != "tensor":
            raise _refuse(where, f"static input_activations with strategy {inputs.get('strategy')!r}")
    return CompressedTensorsCodec(config, fmt, weights, static_input=static)
