"""W8A8 matmul: ``torch._int_mm`` (int8 x int8 -> int32, CPU and CUDA) and an exact reference.

Both paths quantize ``x`` the same way (per token, or with the static per-tensor scale), compute the
integer products exactly (int32 in ``_int_mm``; float64 in the reference, exact below 2**53), convert the
accumulator to float32 and apply ``s_x * s_w`` in the same order, so their outputs are bit-identical.
The int8 weight is passed to ``_int_mm`` as a transposed view of its stored rows (no copy).
On CUDA the paths of ``hfquant.kernels.cuda_paths`` run instead (cuBLASLt or Triton int8 GEMMs, same numerics).
On a CPU with AVX512-VNNI (or AVX2), one float32 row (decode) runs hfquant's own GEMV
(``hfquant.kernels.cpu_ext``): the same quantization of ``x``, exact int32 dot products (``VPDPBUSD``, or
``VPMADDWD`` on AVX2) and the same float32 epilogue in one C++ call, bit-identical for finite ``x`` (a NaN in
``x`` makes its row's outputs NaN).

More rows on a CPU without AVX512-VNNI, where ``torch._int_mm`` is a plain loop (``hfquant.kernels.isa``), one of
two, whichever this machine runs faster for the shape class (in, out, rows rounded to a power of two;
``HFQUANT_CPU_W8A8`` unset or ``reproducible``: timed once per machine and recorded, ``hfquant.kernels.choices``, so
every process takes the same; ``fastest``: timed by each process; ``int`` or ``tiles`` forces one):

* ``int``: hfquant's exact int8 GEMM for AVX2 (``w8a8_cpu_int_gemm``; 16-bit multiply-adds, ``VPMADDWD``), the
  same int32 accumulator as ``_int_mm`` and so bit-identical to the reference;
* ``tiles``: the int8 codes of ``x`` times tiles of the int8 weight converted to float32, by torch's float32
  GEMM (``w8a8_float_tiles``): the speed of a float32 Linear, the integer products exact and their sums
  rounded as float32 sums are (relative error about 1e-7 against the reference).
"""

from __future__ import annotations

import torch

from hfquant.core.smoothquant import quantize_activation_int8
from hfquant.kernels import cpu_ext
from hfquant.kernels.common import choose_path, forced_reference, PathFamily
from hfquant.kernels.cuda_paths import w8a8_cuda
from hfquant.kernels.operands import cached_operands
from hfquant.kernels.isa import int8_gemm_is_fast

# hfquant's VNNI GEMV (csrc) quantizes and multiplies one float32 row per call (decode); more rows go to
# torch._int_mm, which reads the int8 weight once for all of them.
CPU_GEMV_MAX_ROWS = 1
# Rows of the int8 weight converted to float32 at a time by ``w8a8_float_tiles`` (about 16 MB at 4096 columns).
FLOAT_TILE_BYTES = 16 << 20


def _quantize_input(x: torch.Tensor, module):
    static = None if module.dynamic else module.input_scale
    return quantize_activation_int8(x.reshape(-1, x.shape[-1]), static)


def _finish(acc32: torch.Tensor, sx: torch.Tensor, x: torch.Tensor, module) -> torch.Tensor:
    y = acc32 * sx * module.weight_scale
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


def w8a8_reference(x: torch.Tensor, module) -> torch.Tensor:
    """Exact integer products in float64, then the same float32 epilogue as the fast path."""
    qx, sx = _quantize_input(x, module)
    w = module.weight.reshape(module.out_features, module.in_features)
    acc = (qx.double() @ w.double().t()).float()
    return _finish(acc, sx, x, module)


def _weight_t(module) -> torch.Tensor:
    """The int8 weight as ``[in, out]`` for ``_int_mm``: a transposed view of the stored ``[out, in]`` rows
    (no copy). oneDNN is faster with this layout than with a contiguous ``[in, out]`` copy: 3.4x at M=1 and
    equal or better up to M=512 (4096x4096, one thread)."""
    return module.weight.reshape(module.out_features, module.in_features).t()


def w8a8_int_mm(x: torch.Tensor, module) -> torch.Tensor:
    """``torch._int_mm`` path."""
    qx, sx = _quantize_input(x, module)
    acc = torch._int_mm(qx, _weight_t(module)).float()
    return _finish(acc, sx, x, module)


def w8a8_float_tiles(x: torch.Tensor, module, tile: int | None = None) -> torch.Tensor:
    """W8A8 without an int8 GEMM: the activation codes (as float32) times tiles of the weight codes converted to
    float32, by torch's float32 GEMM; the same epilogue as the other paths. The products are exact, their sums are
    float32 sums (about 1e-7 relative to the exact integer sums; summing 1024-column chunks exactly and adding them in
    int32 gave the reference's bits but was measured 10-30% slower on an AVX-512 Xeon, so it was dropped: the machine's
    recorded path choice keeps the numbers the same from process to process anyway)."""
    qx, sx = _quantize_input(x, module)
    w = module.weight.reshape(module.out_features, module.in_features)
    tile = tile or max(64, FLOAT_TILE_BYTES // (4 * module.in_features))
    qf = qx.float()
    acc = qf.new_empty(qf.shape[0], module.out_features)
    for n0 in range(0, module.out_features, tile):
        n1 = min(module.out_features, n0 + tile)
        acc[:, n0:n1] = qf @ w[n0:n1].float().t()
    return _finish(acc, sx, x, module)


def _int_gemm_kernel():
    """The compiled extension when it has the AVX2 int8 GEMM, else ``None``."""
    ext = cpu_ext.extension()
    return ext if ext is not None and hasattr(ext, "w8a8_int_gemm") else None


def w8a8_cpu_int_gemm(x: torch.Tensor, module) -> torch.Tensor | None:
    """hfquant's exact int8 GEMM (AVX2), the ``_int_mm`` contract; ``None`` where it is not built."""
    ext = _int_gemm_kernel()
    if ext is None:
        return None
    qx, sx = _quantize_input(x, module)
    w = module.weight.reshape(module.out_features, module.in_features)
    acc = cpu_ext.kernel(ext, "w8a8_int_gemm")(qx.contiguous(), w).float()
    return _finish(acc, sx, x, module)


_MANY_ROWS_CHOICE: dict[tuple, str] = {}  # (mode, shape class) -> "int" or "tiles", decided once per process
# The int GEMM's sums are exact, the tiles' float32 (~1e-7): the machine's recorded timing chooses (``choose_path``).
MANY_ROWS_CANDIDATES = ("int", "tiles")
_MANY_ROWS_FAMILY = PathFamily("HFQUANT_CPU_W8A8", MANY_ROWS_CANDIDATES,
                               warn_as="a W8A8 {in_f}x{out_f} Linear at {rows} rows")


def _many_rows_paths():
    return {"int": w8a8_cpu_int_gemm, "tiles": w8a8_float_tiles}


def w8a8_cpu_many_rows(x: torch.Tensor, module) -> torch.Tensor:
    """Several rows on a CPU without a fast ``_int_mm``: hfquant's int8 GEMM or the float32 tiles, whichever
    ``HFQUANT_CPU_W8A8`` says (by default the faster on this machine, recorded per shape class)."""
    rows = x.numel() // max(1, x.shape[-1])
    key = (module.in_features, module.out_features, rows.bit_length())
    y = choose_path(_MANY_ROWS_FAMILY, _MANY_ROWS_CHOICE, key, _many_rows_paths(), x, module)
    return y if y is not None else w8a8_float_tiles(x, module)  # the int GEMM is not built here


def _gemv_operands(module):
    """(int8 weight [out, in], float32 weight scales, int32 row sums of the weight, float32 bias or None, the
    static input scale or 0 for per-token scales), built once per module."""
    def build():
        w = module.weight.reshape(module.out_features, module.in_features).contiguous()
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        static = 0.0 if module.dynamic else float(module.input_scale)
        return (w, module.weight_scale.float().contiguous(), w.sum(dim=1, dtype=torch.int32), bias, static)
    return cached_operands(module, "cpu_w8a8_gemv", build)


def _gemv_kernel():
    """The compiled extension when it has the W8A8 GEMV (AVX512-VNNI or AVX2), else ``None``."""
    ext = cpu_ext.extension()
    return ext if ext is not None and hasattr(ext, "w8a8_gemv") else None


def prepare_module(module) -> None:
    """Build the CPU GEMV's operands (called once at load time)."""
    if module.weight.device.type == "cpu" and _gemv_kernel() is not None:
        _gemv_operands(module)


def w8a8_cpu_gemv(x: torch.Tensor, module) -> torch.Tensor | None:
    """hfquant's GEMV for few float32 rows, or ``None`` where it is not built (no compiler, neither VNNI nor AVX2)."""
    ext = _gemv_kernel()
    if ext is None:
        return None
    w, w_scale, rowsum, bias, static = _gemv_operands(module)
    return cpu_ext.kernel(ext, "w8a8_gemv")(x.contiguous(), w, w_scale, rowsum, bias, static)


def w8a8_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Dispatch: on CUDA the faster of cuBLASLt's int8 GEMM and Triton's, each between the fused activation
    quantization and epilogue (``hfquant.kernels.cuda_paths``); on CPU hfquant's GEMV for one
    float32 row where it is built, else ``_int_mm`` where it is fast (AVX512-VNNI), else the faster of hfquant's
    int8 GEMM and the float32 tiles."""
    if forced_reference():
        return w8a8_reference(x, module)
    if x.device.type == "cuda":
        y = w8a8_cuda(x, module)
        return y if y is not None else w8a8_int_mm(x, module)
    if x.device.type == "cpu":
        if x.dtype is torch.float32 and x.numel() <= CPU_GEMV_MAX_ROWS * x.shape[-1] and module.weight.device.type == "cpu":
            y = w8a8_cpu_gemv(x, module)
            if y is not None:
                return y
        return w8a8_int_mm(x, module) if int8_gemm_is_fast() else w8a8_cpu_many_rows(x, module)
    return w8a8_reference(x, module)
