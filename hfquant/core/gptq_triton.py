"""GPTQ's column loop fused into one Triton kernel per segment of a lazy-update block.

The column loop (``hfquant.core.gptq._quantize_columns``) quantizes one column at a time and spreads its error over
the block's later columns; in PyTorch that is a few small kernels per column (38,912 columns in a Llama-3-8B-shaped
layer), and on a GPU the launches dominate (90% of a solve on an H200). Output rows are independent in that loop, so
here one program owns a tile of ``BR`` rows of the block (``[BR, block]`` in registers) and walks the columns itself:
one launch per *segment*, the columns between two points where a grid is fitted (``segment_end`` of the grid policy:
a group's start for grids fitted on the updated weights, none for static grids), so one or a few per block.

The arithmetic is the PyTorch loop's, operation by operation: codes ``clamp(round((w - offset) / s) + zero, lo, hi)``
(round half to even; a zero scale gives ``zero``), values ``s * (q - zero) (+ offset)``, loss
``(w - v)^2 / d^2 / 2`` and error ``(w - v) / d`` with ``d = Hinv[i, i]``, update ``W[:, j] -= err * Hinv[i, j]``
for ``j >= i``; divisions correctly rounded (``div_rn``). Under ``TRITON_INTERPRET=1`` (numpy, no fused
multiply-add) the result is bit-identical to the PyTorch loop (the CPU tests); compiled for a GPU the compiler may
fuse ``w - err * h`` into one multiply-add (one rounding less), so codes agree to within the oracle test's margin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16


@triton.jit
def round_half_even(v):
    """``torch.round`` in float32: ``floor`` plus the fraction's rounding, ties to the even integer (exact: ``v -
    floor(v)`` is representable)."""
    fl = tl.floor(v)
    frac = v - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return fl + tl.where(up, 1.0, 0.0)


@triton.jit
def _gptq_segment_kernel(w_ptr, h_ptr, s_ptr, z_ptr, o_ptr, q_ptr, pre_ptr, err_ptr, loss_ptr,
                         ROWS, B, C0, N, stride_w, stride_h, stride_q, LO, HI,
                         HAS_OFFSET: tl.constexpr, BR: tl.constexpr, BB: tl.constexpr):
    """Columns ``C0 .. C0 + N - 1`` of the block ``w`` ``[ROWS, B]`` (updated in place), for ``BR`` rows per
    program. ``s``/``z``/``o``: the columns' grids ``[ROWS, N]``; ``q``/``pre``: codes and pre-rounding values,
    column ``t`` of the segment at ``ptr + row * stride_q + t``; ``err`` ``[ROWS, B]`` (stride ``stride_w``);
    ``loss`` ``[ROWS]`` accumulated."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BB)
    r_ok = r < ROWS
    c_ok = c < B
    tile = r[:, None] * stride_w + c[None, :]
    w = tl.load(w_ptr + tile, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    loss = tl.load(loss_ptr + r, mask=r_ok, other=0.0)
    for t in range(0, N):
        i = C0 + t
        col = tl.sum(tl.where(c[None, :] == i, w, 0.0), axis=1)  # exact: one term is not zero
        s = tl.load(s_ptr + r * N + t, mask=r_ok, other=1.0)
        z = tl.load(z_ptr + r * N + t, mask=r_ok, other=0.0)
        if HAS_OFFSET:
            o = tl.load(o_ptr + r * N + t, mask=r_ok, other=0.0)
            v = tl.div_rn(col - o, tl.where(s == 0.0, 1.0, s))
        else:
            v = tl.div_rn(col, tl.where(s == 0.0, 1.0, s))
        q = tl.where(s == 0.0, z, round_half_even(v) + z)
        q = tl.minimum(tl.maximum(q, LO), HI)
        if HAS_OFFSET:
            value = s * (q - z) + o
        else:
            value = s * (q - z)
        d = tl.load(h_ptr + i * stride_h + i)
        diff = col - value
        loss += tl.div_rn(tl.div_rn(diff * diff, d * d), 2.0)
        err = tl.div_rn(diff, d)
        tl.store(pre_ptr + r * stride_q + t, col, mask=r_ok)
        tl.store(q_ptr + r * stride_q + t, q, mask=r_ok)
        tl.store(err_ptr + r * stride_w + i, err, mask=r_ok)
        h = tl.load(h_ptr + i * stride_h + c, mask=c_ok & (c >= i), other=0.0)
        w = tl.where((c >= i)[None, :], w - err[:, None] * h[None, :], w)
    tl.store(w_ptr + tile, w, mask=r_ok[:, None] & c_ok[None, :])
    tl.store(loss_ptr + r, loss, mask=r_ok)


def run_segment(block, j1: int, j2: int, segment, codes: torch.Tensor, pre: torch.Tensor, losses: torch.Tensor):
    """Quantize columns ``j1:j2`` (processing order, inside ``block``, a ``hfquant.core.gptq._Block``) on the grids of
    ``segment`` (a ``ColumnSegment``), as the PyTorch loop does; writes ``codes`` / ``pre`` ``[rows, cols]``, adds to
    ``losses`` and updates ``block.w1`` and ``block.err1``."""
    w1, err1 = block.w1, block.err1
    rows, width = w1.shape
    assert w1.is_contiguous() and err1.is_contiguous() and codes.stride(0) == pre.stride(0)
    hinv1 = block.hinv1.contiguous()
    n = j2 - j1
    scale, zero = segment.scale.contiguous(), segment.zero.contiguous()
    offset = segment.offset.contiguous() if segment.offset is not None else scale
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _gptq_segment_kernel[grid](w1, hinv1, scale, zero, offset, codes[:, j1:], pre[:, j1:], err1, losses,
                               rows, width, j1 - block.i1, n, w1.stride(0), hinv1.stride(0), codes.stride(0),
                               float(segment.lo), float(segment.hi), HAS_OFFSET=segment.offset is not None,
                               BR=ROWS_PER_PROGRAM, BB=triton.next_power_of_2(width))
