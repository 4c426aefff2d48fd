"""Quantized modules (plain ``nn.Module``s with named tensors and a ``from_float`` constructor), ``HalfStoredLinear``
(a float32 Linear held exactly in 16 bits), and ``prepare_model``, which builds the quantized modules' kernel
operands once at load time."""

from __future__ import annotations

from hfquant.kernels import weight_only as weight_only_kernels
from hfquant.kernels import w8a8 as w8a8_kernels
from hfquant.nn.gguf import QuantLinearGGUF
from hfquant.nn.half import HalfStoredLinear
from hfquant.nn.w8a8 import QuantLinearW8A8
from hfquant.nn.weight_only import QuantLinearWeightOnly


def prepare_model(model) -> int:
    """Build every quantized Linear's kernel operands once (at load time): weight-only modules in their CPU
    kernels' layouts, and on a CPU with hfquant's VNNI kernel the W8A8 GEMV's operands (``_int_mm`` itself reads
    a view of the stored weight). ``torch.compile`` needs them built before it traces the model.

    Returns the number of modules prepared. Calling it again is free (the operands are cached).
    """
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinearWeightOnly):
            weight_only_kernels.prepare_module(m)
            n += 1
        elif isinstance(m, QuantLinearW8A8):
            w8a8_kernels.prepare_module(m)
            n += 1
    return n


__all__ = ["HalfStoredLinear", "QuantLinearGGUF", "QuantLinearW8A8", "QuantLinearWeightOnly", "prepare_model"]
