"""`none`: an unquantized checkpoint. Tensors are plain floats (or integers) copied byte for byte;
the only conversion is a cast between plain float dtypes, done when a parameter is filled."""

from __future__ import annotations

from .base import Codec


class NoneCodec(Codec):
    name = "none"

    def describe(self) -> str:
        return "unquantized"
