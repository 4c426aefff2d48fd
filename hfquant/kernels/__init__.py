"""Kernels, chosen at call time by device, dtype and shape. The pure PyTorch reference is the oracle."""

from __future__ import annotations

import contextlib
import os

from hfquant.kernels.w4a16 import w4a16_linear, w4a16_reference

__all__ = ["prepare_model", "reference_kernels", "w4a16_linear", "w4a16_reference"]


@contextlib.contextmanager
def reference_kernels():
    """Run quantized Linears on the exact float32 reference inside the block (``HFQUANT_KERNEL=reference``):
    for comparing formats or algorithms without the fast kernels' bf16 rounding."""
    old = os.environ.get("HFQUANT_KERNEL")
    os.environ["HFQUANT_KERNEL"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HFQUANT_KERNEL", None)
        else:
            os.environ["HFQUANT_KERNEL"] = old


def prepare_model(model) -> int:
    """Build every quantized Linear's kernel operands once (at load time): W4A16 weights in its CPU kernels'
    layouts, and on a CPU with hfquant's VNNI kernel the W8A8 GEMV's operands (``_int_mm`` itself reads a
    view of the stored weight). ``torch.compile`` needs them built before it traces the model.

    Returns the number of modules prepared. Calling it again is free (the operands are cached).
    """
    from hfquant.kernels import w4a16, w8a8
    from hfquant.nn.w4a16 import QuantLinearW4A16
    from hfquant.nn.w8a8 import QuantLinearW8A8

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinearW4A16):
            w4a16.prepare_module(m)
            n += 1
        elif isinstance(m, QuantLinearW8A8):
            w8a8.prepare_module(m)
            n += 1
    return n
