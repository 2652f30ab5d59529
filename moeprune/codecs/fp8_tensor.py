"""`fp8_tensor`: per-tensor FP8 as AutoFP8 writes it (neuralmagic `Mixtral-8x7B-Instruct-v0.1-FP8`
and the other `-FP8` releases of its time), `quant_method: fp8` without `weight_block_size`.

`quantization_config = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers":
["lm_head", "model.layers.0.block_sparse_moe.gate", ...]}`. A quantized Linear `X.weight` [out, in]
is stored as F8_E4M3 with `X.weight_scale` F32 [] (one scale for the whole tensor) and, with
static activations, `X.input_scale` F32 []; value = code * weight_scale. Those are exactly the
keys of compressed-tensors' float-quantized "tensor" strategy, so this codec is that decoding
(`compressed_tensors.CompressedTensorsCodec`), with the same checks and the same export: kept
experts byte for byte, and a static `input_scale` of a kept expert written as the max over its
layer's experts (vLLM serves a layer with that max). Other fmt values than e4m3, KV-cache scales
(`kv_cache_scheme`), scales that are not per-tensor and activation schemes other than static or
dynamic are refused in one line.
"""

from __future__ import annotations

from ..errors import MoepruneError
from ..reader import CheckpointReader
from .compressed_tensors import FLOAT, CompressedTensorsCodec

# compressed-tensors' description of AutoFP8's weights: 8-bit float, one scale a tensor
WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}


class Fp8TensorCodec(CompressedTensorsCodec):
    name = "fp8_tensor"
    scheme = "per-tensor fp8 (AutoFP8)"

    def __init__(self, config: dict, static_input: bool):
        super().__init__(config, FLOAT, WEIGHTS, static_input)

    def describe(self) -> str:
        return "fp8 e4m3 with per-tensor scales (AutoFP8, " + \
            ("static input_scale)" if self.static_input else "dynamic activations)")

    def check(self, reader: CheckpointReader, key: str, experts: int | None = None) -> None:
        block = f"{key}_scale_inv"  # block FP8's companion: a config that lost its weight_block_size
        if self.encoded(reader, key) and block in reader:
            raise MoepruneError(f"{reader.folder} holds {block} (block FP8 scales) for {key}, but its fp8 "
                                f"quantization_config is without weight_block_size (per-tensor FP8): cannot tell "
                                f"the block size")
        super().check(reader, key, experts)


def from_config(config: dict, where: str) -> Fp8TensorCodec:
    """The codec for a `quant_method: fp8` config without `weight_block_size` (fmt already checked)."""
    scheme = str(config.get("activation_scheme") or "dynamic").lower()
    if scheme not in ("static", "dynamic"):
        raise MoepruneError(f"{where}: fp8 quantization with activation_scheme {scheme!r} is not supported by "
                            f"moeprune (static or dynamic is)")
    kv = config.get("kv_cache_scheme")
    if kv:
        raise MoepruneError(f"{where}: fp8 quantization with KV-cache scales (kv_cache_scheme {kv!r}) is not "
                            f"supported by moeprune yet")
    return Fp8TensorCodec(config, static_input=scheme == "static")
