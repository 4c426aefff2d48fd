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
    """Convert every W4A16 Linear's weights into its CPU kernel's layout once (at load time); W8A8 needs
    no conversion (``_int_mm`` reads a view of the stored weight).

    Returns the number of modules prepared. Calling it again is free (the operands are cached).
    """
    from hfquant.kernels import w4a16
    from hfquant.nn.w4a16 import QuantLinearW4A16

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinearW4A16):
            w4a16.prepare_module(m)
            n += 1
    return n
