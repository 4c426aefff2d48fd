"""A float Linear whose weight is stored in 16 bits, exactly: the matmul, dispatched by device, dtype and rows.

A model loaded in float32 from a bf16 or fp16 checkpoint (how Llama, Mistral, Qwen and most others ship) holds
float32 weights whose values are exactly bf16 or fp16 ones. The output head a weight-only quantized model keeps
float (``lm_head``, up to a third of a small model's bytes) can then be stored in 16 bits with no change to any
value (``hfquant.nn.HalfStoredLinear``). The result is float32 arithmetic on float32 activations, as before:

* **CPU, float32 ``x``, up to ``GEMV_MAX_ROWS`` rows** (decode): hfquant's C++ kernel ``half_gemv`` (AVX2 + F16C
  or AVX-512) widens each 16-bit weight to float32 in registers and accumulates with FMAs. It reads half the bytes of
  a float32 GEMV; its sums differ from ``F.linear``'s only in order (about 1e-6 relative).
* **CPU, float32, more rows** (prefill): tiles of W converted to float32 (about 16 MB each) and torch's float32 GEMM.
* Which of the two runs for a shape class is timed once per process (``fastest_path``; ``HFQUANT_CPU_HALF``:
  ``auto``, ``gemv`` or ``tiles``).
* Anything else (bf16/fp16 ``x``, CUDA): ``F.linear`` with the weight cast to ``x``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfquant.kernels import cpu_ext
from hfquant.kernels.common import fastest_path

GEMV_MAX_ROWS = 16  # the GEMV re-reads a cached block of W per row of x: from here on the tiles always win
TILE_BYTES = 16 << 20  # float32 bytes of W per converted tile


def cpu_gemv_available() -> bool:
    """Whether hfquant's CPU extension has the 16-bit-weight GEMV (built with AVX2 + F16C or AVX-512)."""
    ext = cpu_ext.extension()
    return ext is not None and hasattr(ext, "half_gemv")


def _bias(module, x: torch.Tensor) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.to(x.dtype)


def half_cpu_gemv(x: torch.Tensor, module) -> torch.Tensor | None:
    """Few float32 rows: hfquant's ``half_gemv`` (``None`` with more rows or without the kernel)."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows > GEMV_MAX_ROWS or not cpu_gemv_available():
        return None
    w = module.weight
    bias = None if module.bias is None else module.bias.float().contiguous()
    return cpu_ext.kernel(cpu_ext.extension(), "half_gemv")(x.contiguous(), w.view(torch.int16), bias,
                                                            w.dtype is torch.bfloat16)


def half_cpu_tiles(x: torch.Tensor, module) -> torch.Tensor:
    """Float32 rows: W converted to float32 a tile of rows at a time, each tile multiplied by torch's GEMM."""
    w = module.weight
    n, k = w.shape
    x2 = x.reshape(-1, k)
    tile = max(64, TILE_BYTES // (4 * k))
    if tile >= n:
        y = F.linear(x2, w.float(), _bias(module, x2))
    else:
        y = x2.new_empty(x2.shape[0], n)
        for n0 in range(0, n, tile):
            n1 = min(n, n0 + tile)
            y[:, n0:n1] = F.linear(x2, w[n0:n1].float())
        if module.bias is not None:
            y += module.bias.float()
    return y.view(*x.shape[:-1], n)


_CHOICE: dict[tuple, str] = {}  # shape class -> "gemv" or "tiles", decided once per process


def half_linear(x: torch.Tensor, module) -> torch.Tensor:
    """``x @ W^T + b`` for a module with a 16-bit ``weight`` (and optional ``bias``), see the module docstring."""
    w = module.weight
    if w.dtype is x.dtype:  # a model cast to the weight's dtype (model.to(torch.bfloat16)), or never stored in 16 bits
        return F.linear(x, w, _bias(module, x))
    if x.device.type == "cpu" and w.device.type == "cpu" and x.dtype is torch.float32:
        rows = x.numel() // max(1, x.shape[-1])
        key = (module.in_features, module.out_features, rows.bit_length())
        traced = "gemv" if rows <= GEMV_MAX_ROWS and cpu_gemv_available() else "tiles"
        y = fastest_path(_CHOICE, key, {"gemv": half_cpu_gemv, "tiles": half_cpu_tiles}, "HFQUANT_CPU_HALF", traced,
                         x, module, "a float32 {in_f}x{out_f} Linear stored in 16 bits at {rows} rows")
        return y if y is not None else half_cpu_tiles(x, module)  # HFQUANT_CPU_HALF=gemv where the GEMV cannot run
    return F.linear(x, w.to(x.dtype), _bias(module, x))
