"""Kernels, chosen at call time by device, dtype and shape. The pure PyTorch reference is the oracle.

Layout: ``operands`` (the per-module operand cache, the group-sorted packed weight), ``common`` (reference switch,
timed path choice, guarded Triton import), ``choices`` (the machine's record of path choices), ``cpu_ext`` (the C++
extension, ``csrc/``) and ``jit_build`` (its per-environment build folder and lock), ``isa`` (the instruction set),
``weight_only`` (2/3/4/8-bit codes, float activations) and ``w8a8`` (dispatch and the CPU paths),
``half`` (float32 Linears held exactly in 16 bits), ``triton_kernels`` (CUDA). Kernels are duck-typed: they
read a module's tensors and never import ``hfquant.nn``.
"""

from __future__ import annotations

from hfquant.kernels.common import reference_kernels
from hfquant.kernels.weight_only import weight_only_linear, weight_only_reference

__all__ = ["reference_kernels", "weight_only_linear", "weight_only_reference"]
