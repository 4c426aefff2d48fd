"""Kernels, chosen at call time by device, dtype and shape. The pure PyTorch reference is the oracle."""

from hfquant.kernels.w4a16 import w4a16_linear, w4a16_reference

__all__ = ["w4a16_linear", "w4a16_reference"]
