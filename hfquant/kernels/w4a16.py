"""W4A16 matmul: a pure PyTorch reference and torch's int4 CPU kernel for small batches.

Reference (the oracle every fast path is tested against): dequantize the weight in float32
(``scale[g_idx] * (q - zero[g_idx])``) and call ``F.linear``. It is also the fastest choice on CPU for
prefill-sized inputs, where the dense float32 GEMM beats the int4 kernel.

CPU int4 path (``torch.ops.aten._weight_int4pack_mm_for_cpu``), used for up to ``DECODE_MAX_ROWS``
rows (decode): the kernel's fast (AVX-512) path takes bfloat16 activations, so ``x`` is cast to bf16
and the result back to ``x.dtype``; that costs about 3e-3 relative error against the float32
reference (tests state the tolerance). It dequantizes ``w = (q - 8) * s + z`` per group of
``group_size`` consecutive input columns, so our ``s * (q - zero)`` maps to ``z = (8 - zero) * s``.
It needs groups of 32/64/128/256 contiguous columns: act-order checkpoints (non-monotone ``g_idx``)
are handled by permuting the weight's columns once so each group is contiguous and gathering ``x``'s
columns the same way per call; a partial last group is zero-padded (``x`` too). The packed operand
is built once per module and cached (not saved).

``HFQUANT_KERNEL=reference`` forces the reference path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_CPU_GROUPS = (32, 64, 128, 256)
DECODE_MAX_ROWS = 16


def w4a16_reference(x: torch.Tensor, module) -> torch.Tensor:
    """``x @ dequantize(W)^T + b`` with the weight dequantized in float32 and cast to ``x.dtype``."""
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, module.dequantize(torch.float32).to(x.dtype), bias)


def _cpu_int4_operands(module):
    """Build (and cache) the packed weight, scale/zero table and column permutation for the CPU kernel."""
    key = (module.weight.data_ptr(), module.scales.data_ptr(), module.zeros.data_ptr(), module.g_idx.data_ptr())
    cached = module._kernel_cache.get("cpu_int4")
    if cached is not None and cached[0] == key:
        return cached[1]
    ops = None
    g = module.group_size
    if module.bits == 4 and g in _CPU_GROUPS:
        g_idx = module.g_idx.long()
        n_groups = module.scales.shape[1]
        counts = torch.bincount(g_idx, minlength=n_groups)
        # Every group but the last must be whole, or the columns cannot be laid out as contiguous groups.
        if bool((counts[:-1] == g).all()) and 0 < int(counts[-1]) <= g:
            perm = torch.argsort(g_idx, stable=True)
            identity = bool((perm == torch.arange(module.in_features)).all())
            k_pad = n_groups * g
            padded = torch.full((module.out_features, k_pad), 8, dtype=torch.int32)
            padded[:, : module.in_features] = module.codes()[:, perm]
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1)
            s = module.scales.float()
            z = (8 - module.zeros.float()) * s
            scale_zero = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
            ops = (packed, scale_zero, None if identity else perm, k_pad)
    module._kernel_cache["cpu_int4"] = (key, ops)
    return ops


def w4a16_cpu_int4(x: torch.Tensor, module) -> torch.Tensor | None:
    """Torch's int4 CPU kernel (bf16 activations), or ``None`` when the layout does not allow it."""
    ops = _cpu_int4_operands(module)
    if ops is None:
        return None
    packed, scale_zero, perm, k_pad = ops
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if perm is not None:
        x2 = x2[:, perm]
    if k_pad != shape[-1]:
        x2 = F.pad(x2, (0, k_pad - shape[-1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, module.group_size, scale_zero)
    y = y.to(x.dtype)
    if module.bias is not None:
        y = y + module.bias.to(x.dtype)
    return y.reshape(*shape[:-1], module.out_features)


def w4a16_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Dispatch by device, dtype and shape: the int4 CPU kernel for small batches, else the reference."""
    rows = x.numel() // x.shape[-1]
    if (
        rows <= DECODE_MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and module.weight.device.type == "cpu"
        and os.environ.get("HFQUANT_KERNEL", "auto") != "reference"
    ):
        y = w4a16_cpu_int4(x, module)
        if y is not None:
            return y
    return w4a16_reference(x, module)
