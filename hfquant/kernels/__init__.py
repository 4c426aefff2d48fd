"""Kernels, chosen at call time by device, dtype and shape. The pure PyTorch reference is the oracle.

Layout: ``common`` (operand cache, reference switch, guarded Triton import), ``cpu_ext`` (the C++ extension),
``jit_build`` (its per-environment build folder and lock), ``w4a16`` and ``w8a8`` (dispatch and the CPU paths),
``half`` (float32 Linears held exactly in 16 bits), ``triton_kernels`` (CUDA). Kernels are duck-typed: they
read a module's tensors and never import ``hfquant.nn``.
"""

from __future__ import annotations

from hfquant.kernels.common import reference_kernels
from hfquant.kernels.w4a16 import w4a16_linear, w4a16_reference

__all__ = ["reference_kernels", "w4a16_linear", "w4a16_reference"]
