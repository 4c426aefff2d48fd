"""Triton kernels for CUDA: W4A16 (GEMV for decode, GEMM for prefill) and W8A8 (fused per-token
activation quantization, int8 GEMM with the dequantization fused into its epilogue).

Imported only when a CUDA tensor reaches a quantized Linear (or by the tests), so ``import hfquant``
never imports Triton. The kernels are also correct under ``TRITON_INTERPRET=1`` on CPU tensors, which is
how CI checks them against the PyTorch references (``tests/kernels/test_triton_kernels.py``); only their speed
needs a GPU (``scripts/bench_kernels.py``).

W4A16 operands (built once per module by ``weight_only_operands``, cached on the module, not saved):

* ``packed``: int32 ``[N, Kp/8]``, eight 4-bit codes per word, code of column ``k`` at bits
  ``4*(k % 8)`` of word ``k // 8`` -- this is ``QuantLinearWeightOnly.weight`` viewed as 2-D (its layout,
  ``hfquant.core.packing``, is exactly that for 4 bits). Act-order checkpoints (non-monotone ``g_idx``)
  are repacked once with their columns sorted by group, and ``x``'s columns are gathered the same way
  per call, so every kernel sees contiguous groups of ``group_size`` columns (the last may be partial).
* ``scales`` float32 and ``zeros`` int32, ``[G, N]`` (one row per group, so a tile loads them contiguously).

Group sizes must be a power of two >= 32, or -1 (one group per row); a K tile never crosses a group, so
each tile loads one scale and one zero per output. Other layouts (2/3/8-bit codes, odd group sizes) fall
back to the PyTorch reference.

* GEMM (more than ``TRITON_GEMV_MAX_ROWS`` rows): ``w = (q - z) * s`` in float32 -- the same operations as the
  reference (``QuantLinearWeightOnly.dequantize``), so the weight tile is bit-identical to it -- cast to the
  activation dtype, then ``tl.dot`` with float32 accumulation.
* GEMV (decode): one program per ``BN`` outputs runs the whole K loop (no split-K, no atomics:
  deterministic), accumulating ``s * sum((q - z) * x)`` per tile in float32 without rounding the weight to
  the activation dtype -- slightly more accurate than the reference for 16-bit activations.

W8A8: ``quantize_rows`` reproduces ``hfquant.core.smoothquant.quantize_activation_int8`` exactly
(absmax / 127, correctly rounded division, round-half-to-even); ``int8_gemm`` accumulates exactly in
int32 and applies ``acc * s_x * s_w (+ bias)`` in float32 in the same order as the other paths, so its
output equals ``torch._int_mm`` + epilogue and the float64 reference bit for bit under the interpreter;
compiled, the compiler may fuse the bias add into a fused multiply-add (one rounding less), so the GPU
tests allow 1e-6 relative error. Float32 activations use IEEE float32 products in ``tl.dot`` (no TF32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hfquant.core.gptq_triton import round_half_even
from hfquant.kernels.operands import cached_operands, grouped_weight

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("HFQUANT_TRITON_AUTOTUNE", "1") != "0"
# The GEMV kernel gives each program one row of x and a tile of outputs (no tensor cores); up to 4 rows it beats
# the tiled GEMM, whose smallest M tile (16) would waste most of its work on padding rows.
TRITON_GEMV_MAX_ROWS = 4


def _configs(full: list[triton.Config], small: triton.Config) -> list[triton.Config]:
    """Tile configs: all candidates on a GPU (autotuned per shape at the first call; with
    ``HFQUANT_TRITON_AUTOTUNE=0`` the first valid one, for tests); one small config under the interpreter."""
    return [small] if INTERPRET else full


# ------------------------------------------------------------------------------------------- W4A16

def _prune_weight_only(configs, named_args, **kwargs):
    """Keep the tile configs whose K tile stays inside one group."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if args["SINGLE_GROUP"] or c.kwargs["BK"] <= args["GROUP"]]
    return kept if AUTOTUNE else kept[:1]


@triton.autotune(
    configs=_configs(
        [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(16, 64, 64, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4),
                                  (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 32, 4, 4),
                                  (128, 128, 128, 8, 3), (128, 64, 128, 4, 3)]],
        triton.Config({"BM": 16, "BN": 32, "BK": 32}, num_warps=4, num_stages=1),
    ),
    key=["M_BUCKET", "N", "K", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_weight_only},
)
@triton.jit
def _weight_only_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                             stride_xm, stride_wn, stride_ym,
                             GROUP: tl.constexpr, SINGLE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                             PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Prefill: ``y = x @ W^T`` with W dequantized tile by tile (a K tile never crosses a group)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    words_k = tl.arange(0, BK // 8)
    shifts = tl.arange(0, 8) * 4
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        kw = k0 // 8 + words_k
        words = tl.load(w_ptr + rn[None, :] * stride_wn + kw[:, None], mask=(kw * 8 < K)[:, None] & n_ok[None, :],
                        other=0)                                                      # [BK/8, BN]
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BK, BN))  # column k0 + 8j + i
        g = 0 if SINGLE_GROUP else k0 // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(x.dtype)
        acc += tl.dot(x, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(
    configs=_configs(
        [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
         for bn, bk, w, s in [(8, 128, 2, 4), (16, 128, 4, 4), (4, 128, 1, 4), (8, 256, 4, 3), (16, 256, 4, 3),
                              (32, 128, 4, 4), (4, 256, 2, 4), (8, 64, 2, 4), (16, 64, 2, 4), (8, 32, 1, 4),
                              (32, 32, 2, 4)]],
        triton.Config({"BN": 16, "BK": 32}, num_warps=2, num_stages=1),
    ),
    key=["N", "K", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_weight_only},
)
@triton.jit
def _weight_only_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K,
                             stride_xm, stride_wn, stride_ym,
                             GROUP: tl.constexpr, SINGLE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr):
    """Decode: ``BN`` outputs of one row of ``x`` per program, the whole K loop in the program (no split,
    so no atomics: deterministic, one launch, output written in its dtype).

    Per K tile (inside one group) and nibble ``i``: ``acc += s * (q_i - z) * x[8j + i]`` on ``[BN, BK/8]``.
    """
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    words_k = tl.arange(0, BK // 8)
    acc = tl.zeros((BN, BK // 8), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kw = k0 // 8 + words_k
        words = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :], mask=n_ok[:, None] & (kw * 8 < K)[None, :],
                        other=0)                                                      # [BN, BK/8]
        g = 0 if SINGLE_GROUP else k0 // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0)
        part = tl.zeros((BN, BK // 8), dtype=tl.float32)
        for i in tl.static_range(8):
            k = kw * 8 + i
            x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            q = (words >> (4 * i)) & 0xF
            part += (q - z[:, None]).to(tl.float32) * x[None, :]
        acc += part * s[:, None]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def weight_only_operands(module, device: torch.device):
    """(packed int32 [N, Kp/8], scales f32 [G, N], zeros i32 [G, N], column perm or None), or None.

    ``None`` when the module's layout has no Triton kernel: bits other than 4, groups that are not a
    power of two >= 32 (or -1), or act-order groups that are not whole sets of ``group_size`` columns.
    """
    def build():
        g = module.group_size
        if module.bits != 4 or not (g == -1 or (g >= 32 and g & (g - 1) == 0)):
            return None
        grouped = grouped_weight(module)
        if grouped is None:
            return None
        packed, perm = grouped
        return (packed.reshape(module.out_features, -1).to(device).contiguous(), module.scales.float().t().to(device).contiguous(),
                module.zeros.t().to(device=device, dtype=torch.int32).contiguous(),
                None if perm is None else perm.to(device))
    return cached_operands(module, "triton_weight_only", build, extra=(str(device),))


def _bucket(m: int) -> int:
    """Autotune key for the row count: powers of two, so decode and prefill shapes tune separately."""
    return 1 << max(m - 1, 0).bit_length()


def weight_only_triton(x: torch.Tensor, module) -> torch.Tensor | None:
    """Weight-only 4-bit codes (W4A16) on CUDA (or under the interpreter); ``None`` when the module's layout is not
    supported."""
    ops = weight_only_operands(module, x.device)
    if ops is None:
        return None
    packed, scales, zeros, perm = ops
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if perm is not None:
        x2 = x2[:, perm]
    x2 = x2.contiguous()
    m, k = x2.shape
    n = module.out_features
    single = module.group_size == -1
    meta = dict(GROUP=k if single else module.group_size, SINGLE_GROUP=single, HAS_BIAS=module.bias is not None)
    bias = module.bias if module.bias is not None else x2  # dummy pointer when HAS_BIAS is False
    if m <= TRITON_GEMV_MAX_ROWS:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        grid = lambda c: (triton.cdiv(n, c["BN"]), m)  # noqa: E731
        _weight_only_gemv_kernel[grid](x2, packed, scales, zeros, bias, y, n, k, x2.stride(0), packed.stride(0),
                                       y.stride(0), **meta)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        grid = lambda c: (triton.cdiv(m, c["BM"]), triton.cdiv(n, c["BN"]))  # noqa: E731
        _weight_only_gemm_kernel[grid](x2, packed, scales, zeros, bias, y, m, n, k, _bucket(m),
                                       x2.stride(0), packed.stride(0), y.stride(0),
                                       PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **meta)
    return y.reshape(*shape[:-1], n)


# ------------------------------------------------------------------------------------------------ W8A8

@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm, STATIC: tl.constexpr,
                          BK: tl.constexpr):
    """Per-token (or static per-tensor) symmetric int8: one program per row."""
    row = tl.program_id(0)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BK,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), 127.0), 1e-8)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        # round half to even, as torch.round (not floor(v + 0.5): just below a half, v + 0.5 rounds up to the next
        # integer in float32)
        r = round_half_even(tl.div_rn(x, scale))
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + k, r.to(tl.int8), mask=k < K)


@triton.autotune(
    configs=_configs(
        [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                  (64, 128, 128, 4, 4), (128, 128, 64, 4, 4), (64, 64, 128, 4, 4),
                                  (32, 128, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3),
                                  (32, 64, 256, 4, 3), (64, 64, 256, 4, 3)]],
        triton.Config({"BM": 16, "BN": 32, "BK": 32}, num_warps=4, num_stages=1),
    ),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": lambda configs, *_, **__: configs if AUTOTUNE else configs[:1]},
)
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_bn, stride_ym, HAS_BIAS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``y = (A_int8 @ B_int8^T) * s_a[:, None] * s_b[None, :] (+ bias)``; B is ``[N, K]`` row-major."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def quantize_rows(x2: torch.Tensor, static_scale: torch.Tensor | None):
    """int8 codes ``[M, K]`` and float32 scales ``[M]`` of a contiguous ``[M, K]`` input."""
    m, k = x2.shape
    q = torch.empty(m, k, device=x2.device, dtype=torch.int8)
    s = torch.empty(m, device=x2.device, dtype=torch.float32)
    static = static_scale is not None
    _quantize_rows_kernel[(m,)](x2, q, s, static_scale if static else s, k, x2.stride(0), q.stride(0),
                                STATIC=static, BK=min(1024, triton.next_power_of_2(k)))
    return q, s


def w8a8_triton(x: torch.Tensor, module) -> torch.Tensor:
    """W8A8 on CUDA (or under the interpreter): fused row quantization, then the int8 GEMM."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    qx, sx = quantize_rows(x2, None if module.dynamic else module.input_scale)
    m, k = qx.shape
    n = module.out_features
    w = module.weight.reshape(n, k)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bias = module.bias if module.bias is not None else sx
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _int8_gemm_kernel[grid](qx, w, sx, module.weight_scale, bias, y, m, n, k, _bucket(m),
                            qx.stride(0), w.stride(0), y.stride(0), HAS_BIAS=module.bias is not None)
    return y.reshape(*shape[:-1], n)


@triton.jit
def _int8_epilogue_kernel(acc_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr):
    """``y = acc * s_a[:, None] * s_b[None, :] (+ bias)`` for an int32 ``acc`` from ``torch._int_mm``."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def w8a8_int_mm_cuda(x: torch.Tensor, module) -> torch.Tensor | None:
    """W8A8 through cuBLAS's int8 GEMM (``torch._int_mm``) between the fused Triton row quantization and
    epilogue; ``None`` where ``_int_mm`` does not run (16 rows or fewer, K or N not a multiple of 8)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    n = module.out_features
    if m <= 16 or k % 8 or n % 8:
        return None
    qx, sx = quantize_rows(x2, None if module.dynamic else module.input_scale)
    acc = torch._int_mm(qx, module.weight.reshape(n, k).t())
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bias = module.bias if module.bias is not None else sx
    _int8_epilogue_kernel[(triton.cdiv(m, 32), triton.cdiv(n, 128))](acc, sx, module.weight_scale, bias, y, m, n,
                                                                   HAS_BIAS=module.bias is not None, BM=32, BN=128)
    return y.reshape(*shape[:-1], n)
