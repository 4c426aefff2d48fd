"""A float Linear whose weight is stored in 16 bits, exactly: the matmul, dispatched by device, dtype and rows.

A model loaded in float32 from a bf16 or fp16 checkpoint (how Llama, Mistral, Qwen and most others ship) holds
float32 weights whose values are exactly bf16 or fp16 ones. The output head a weight-only quantized model keeps
float (``lm_head``, up to a third of a small model's bytes) can then be stored in 16 bits with no change to any
value (``hfquant.nn.HalfStoredLinear``). The result is float32 arithmetic on float32 activations, as before:

* **CPU, float32 ``x``, up to ``GEMV_MAX_ROWS`` rows** (decode): hfquant's C++ kernel ``half_gemv`` (AVX2 + F16C
  or AVX-512) widens each 16-bit weight to float32 in registers and accumulates with FMAs. It reads half the bytes of
  a float32 GEMV; its sums differ from ``F.linear``'s only in order (about 1e-6 relative).
* **CPU, float32, more rows** (prefill): tiles of W converted to float32 (4 MB, or 32 MB: ``big_tiles``) and
  torch's float32 GEMM, about float32's speed (the conversion against fewer bytes read).
* Which path runs for a shape class is timed once per machine and recorded, so one model gives the same numbers in
  every process (``HFQUANT_CPU_HALF`` unset or ``reproducible``; ``hfquant.kernels.choices``); ``fastest`` times the
  three in each process, numerics then depending on the winner; ``gemv``, ``tiles`` or ``big_tiles`` forces one.
* Anything else (bf16/fp16 ``x``, CUDA): ``F.linear`` with the weight cast to ``x``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfquant.kernels import cpu_ext
from hfquant.kernels.common import choose_path, PathFamily

# The GEMV multiplies each cached block of W with one row of x at a time, so its time grows with every row; at 16 rows
# (AVX2 code, 4096x4096 and 576x49152) the tiles already matched it: 1.6-2.1x float32 against 1.6-1.7x.
GEMV_MAX_ROWS = 16
# Float32 bytes of W per converted tile, two sizes timed against each other: on a 2-core EPYC (AVX2 code) 4 MB tiles
# were 1.4-3.0x float32 at 4-128 rows and 0.77-1.17x at 256-512; at 512 rows (AVX-512 code), 11008x4096 and
# 4096x11008, 16 MB tiles were 0.94-1.09x, 32 MB 1.00-1.12x, 64 MB 0.95-1.09x, 256 MB 0.84-0.92x.
TILE_BYTES = 4 << 20
BIG_TILE_BYTES = 32 << 20


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


def half_cpu_tiles(x: torch.Tensor, module, tile_bytes: int | None = None) -> torch.Tensor:
    """Float32 rows: W converted to float32 a tile of rows (``tile_bytes``, default ``TILE_BYTES``) at a time into one
    reused buffer (a fresh tensor per tile costs page faults), each tile multiplied by torch's GEMM straight into
    ``y^T`` (``W_tile @ x^T``: faster than ``x @ W_tile^T`` into column slices of ``y``)."""
    w = module.weight
    n, k = w.shape
    x2 = x.reshape(-1, k)
    tile = min(n, max(64, (tile_bytes or TILE_BYTES) // (4 * k)))
    buf = x2.new_empty(tile, k)
    y = x2.new_empty(n, x2.shape[0])  # y^T: each tile's output rows are contiguous
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        wt = buf[: n1 - n0]
        wt.copy_(w[n0:n1])
        torch.mm(wt, x2.t(), out=y[n0:n1])
    y = y.t()
    if module.bias is not None:
        y = y + module.bias.float()
    return y.reshape(*x.shape[:-1], n)


def half_cpu_big_tiles(x: torch.Tensor, module) -> torch.Tensor:
    """``half_cpu_tiles`` with ``BIG_TILE_BYTES`` tiles."""
    return half_cpu_tiles(x, module, BIG_TILE_BYTES)


PATHS = {"gemv": half_cpu_gemv, "tiles": half_cpu_tiles, "big_tiles": half_cpu_big_tiles}
# All three keep the float32 values and sum in float32 (in different orders): the reproducible choice is this machine's
# recorded timing among them (``choose_path``; the GEMV takes up to ``GEMV_MAX_ROWS`` rows).
CANDIDATES = ("gemv", "tiles", "big_tiles")
_FAMILY = PathFamily("HFQUANT_CPU_HALF", CANDIDATES,
                     warn_as="a float32 {in_f}x{out_f} Linear stored in 16 bits at {rows} rows")


_CHOICE: dict[tuple, str] = {}  # (mode, shape class) -> a name in PATHS, as chosen in this process


def half_linear(x: torch.Tensor, module) -> torch.Tensor:
    """``x @ W^T + b`` for a module with a 16-bit ``weight`` (and optional ``bias``), see the module docstring."""
    w = module.weight
    if w.dtype is x.dtype:  # a model cast to the weight's dtype (model.to(torch.bfloat16)), or never stored in 16 bits
        return F.linear(x, w, _bias(module, x))
    if x.device.type == "cpu" and w.device.type == "cpu" and x.dtype is torch.float32:
        rows = x.numel() // max(1, x.shape[-1])
        key = (module.in_features, module.out_features, rows.bit_length())
        y = choose_path(_FAMILY, _CHOICE, key, PATHS, x, module)
        return y if y is not None else half_cpu_tiles(x, module)  # HFQUANT_CPU_HALF=gemv where the GEMV cannot run
    return F.linear(x, w.to(x.dtype), _bias(module, x))
