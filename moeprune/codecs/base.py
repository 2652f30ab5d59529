"""What every codec answers about one logical weight of a checkpoint.

A logical weight is what a model parameter holds (e.g. `...q_proj.weight`, or a fused
`...experts.gate_up_proj`). A codec knows how its quantization scheme stores it: the checkpoint
key of the weight itself, its companion tensors (scales, zero points...), the axis of each that
holds the expert when the tensor is fused over experts, and how to turn the stored bytes into
plain floating-point values. Codecs only read through a `CheckpointReader`; they never guess: a
dtype or a layout they do not know is a one-line `MoepruneError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import MoepruneError
from ..reader import CheckpointReader

# dtypes a parameter may take by a plain cast: every value means what it says
PLAIN_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class Codec:
    """Base codec: stored as is (no companions, no decoding). Subclasses override what differs."""

    name: str = ""
    # where a quantized tensor is fused over experts, this axis of it and of each companion is the expert
    expert_axis: int = 0

    def __init__(self, config: dict | None = None):
        self.config = dict(config or {})

    def describe(self) -> str:
        return self.name

    # ---------------------------------------------------------------- header only
    def stored(self, reader: CheckpointReader, key: str) -> bool:
        """Whether the checkpoint holds weight `key`, under its own name or (a quantized weight
        some schemes store only as companions, e.g. mxfp4 `_blocks`/`_scales`) through them."""
        return key in reader

    def companions(self, reader: CheckpointReader, key: str) -> list[str]:
        """Checkpoint keys that are read together with weight `key` (not `key` itself)."""
        return []

    def encoded(self, reader: CheckpointReader, key: str) -> bool:
        """Whether `key` is stored quantized (its values need decoding, not just a cast)."""
        return False

    def shape(self, reader: CheckpointReader, key: str) -> tuple[int, ...]:
        """The logical (decoded) shape of weight `key`."""
        return reader.shape(key)

    def check(self, reader: CheckpointReader, key: str, experts: int | None = None) -> None:
        """Refuse, from the header alone, a weight this codec cannot decode exactly. `experts`:
        the weight is fused over that many experts (on `expert_axis`), as is every companion."""
        self._refuse_coded_float(reader, key, " but config.json declares no quantization (quantization_config) that "
                                              "says how to decode it; moeprune will not cast quantized codes without "
                                              "their scales")
        if experts is not None:
            self._check_experts(reader, [key, *self.companions(reader, key)], experts)

    @staticmethod
    def _refuse_coded_float(reader: CheckpointReader, key: str, hint: str) -> None:
        """Refuse a tensor stored in a float dtype that holds codes (FP8, ...) where this scheme expects a
        plain float; `hint` (appended to the message) says what the scheme stores instead."""
        dtype = reader.dtype(key)
        if dtype.is_floating_point and dtype not in PLAIN_FLOATS:
            raise MoepruneError(f"tensor {key} of {reader.folder} is stored as {_dtype_name(dtype)}{hint}")

    def _check_experts(self, reader: CheckpointReader, keys: Sequence[str], experts: int) -> None:
        for k in keys:
            shape = reader.shape(k)
            if len(shape) <= self.expert_axis or shape[self.expert_axis] != experts:
                raise MoepruneError(f"fused expert tensor {k} of {reader.folder} has shape {list(shape)}: "
                                    f"expected {experts} experts on axis {self.expert_axis}")

    # ---------------------------------------------------------------- data
    def buffer_dtype(self, reader: CheckpointReader, key: str, target: torch.dtype) -> torch.dtype:
        """The dtype of the buffer `read_into` fills for a parameter of dtype `target`: the stored
        dtype where the bytes are copied as is (cast later, in place of a decode), else `target`."""
        return target if self.encoded(reader, key) else reader.dtype(key)

    def read_into(self, reader: CheckpointReader, key: str, out: torch.Tensor,
                  rows: Sequence[int] | None = None) -> None:
        """Fill `out` with weight `key` (only experts `rows` of a fused weight), decoded."""
        if rows is None:
            reader.get(key, out=out)
        else:
            reader.get_rows(key, rows, out=out)

    def export_tensor(self, reader: CheckpointReader, key: str,
                      siblings: Sequence[str]) -> Callable[[], torch.Tensor] | None:
        """How export writes `key`, a tensor of a kept expert, where a byte copy would change what
        is served (None: copy it). `siblings`: the same tensor of every expert of its layer."""
        return None

    def export_note(self) -> str:
        """A sentence for the export's model card on how the export differs from a byte copy ('' if not)."""
        return ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
