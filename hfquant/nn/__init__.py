"""Quantized modules (plain ``nn.Module``s with named tensors and a ``from_float`` constructor)."""

from hfquant.nn.packing import pack_codes, unpack_codes
from hfquant.nn.w4a16 import QuantLinearW4A16

__all__ = ["QuantLinearW4A16", "pack_codes", "unpack_codes"]
