"""GGUF's block types as quantization grids for RTN and GPTQ: fitting the stored scales, then codes on them.

A GGUF block type (``hfquant.core.gguf_blocks``) stores, per group of 32 or 16 weights of a row, a
grid whose float32 values are ``scale * (q - zero) + offset`` for integer codes ``q`` in ``[lo, hi]``
(groups of 16 for Q3_K and Q6_K):

======  ===========================  ========  =======================  ===========
type    scale                        zero      offset                   codes
======  ===========================  ========  =======================  ===========
Q8_0    ``d``                        0         0                        -128..127
Q4_0    ``d``                        8         0                        0..15
Q5_0    ``d``                        16        0                        0..31
Q4_1    ``d``                        0         ``m``                    0..15
Q5_1    ``d``                        0         ``m``                    0..31
Q3_K    ``d * sc`` (float32)         4         0                        0..7
Q4_K    ``d * sc`` (float32)         0         ``-(dmin * mn)``         0..15
Q5_K    ``d * sc`` (float32)         0         ``-(dmin * mn)``         0..31
Q6_K    ``d * sc`` (float32)         32        0                        0..63
======  ===========================  ========  =======================  ===========

(``d``, ``m``, ``dmin`` are float16 values, ``sc``/``mn`` the k-quants' 6-bit or int8 sub-scales.) These are
the same float32 operations as ggml's de-quantization, so the weights GPTQ calibrates against are the ones
llama.cpp computes from the file.

``fit_block_grid`` chooses the stored parameters of one span of columns (one 32-block, or one 256-value
super-block for the k-quants, whose sub-scales are quantized together). The choices follow llama.cpp's
reference quantizers (``ggml-quants.c``), described in its source and re-derived here:

* Q8_0: ``d = absmax / 127``. Q4_0 / Q5_0: ``d = -m / 8`` (``/ 16``) with ``m`` the block's largest-magnitude
  weight, sign kept, so that weight sits exactly on the code ``0``; calibrated (GPTQ), the importance-weighted
  search of llama.cpp's ``make_qx_quants`` with an importance matrix instead (weights ``imp_j * sqrt(sigma^2 +
  x_j^2)``, ``imp`` from GPTQ's Hessian). Q4_1 / Q5_1: ``d = (max - min) / 15``
  (``/ 31``), ``m = min``.
* Q4_K / Q5_K: per 32-value sub-block, a weighted least-squares search over candidate inverse scales
  ``(nmax + rmin + k / 10) / (max - min)`` (Q4_K: ``nmax = 15``, ``rmin = -1``, ``k`` in 0..20; Q5_K: 31, -0.5,
  0..15) for the scale and the (non-positive) minimum (importance ``sqrt(mean x^2) + |x|`` per weight, as
  llama.cpp's ``make_qkx2_quants`` without an importance matrix); then the eight scales and minimums of the
  super-block are quantized to 6 bits against ``d = max scale / 63`` and ``dmin = max min / 63``.
* Q3_K: per 16-value sub-block, the signed-max scale on the level ``-4``, then up to five passes that move one
  level at a time where that raises ``(sum w x L)^2 / sum w L^2`` (``w = x^2``; llama.cpp's ``make_q3_quants``
  with ``do_rmse``); the 16 scales are quantized to 6 signed bits against ``d = max / -32``.
* Q6_K: per 16-value sub-block, the signed-max scale refined by least squares over 19 nearby candidates
  (importance ``x^2``, as ``make_qx_quants``); the 16 scales are quantized to int8 against ``d = max / -128``.

One difference from llama.cpp, deliberately: codes are always chosen on the *stored* grid (the float16 ``d``
and the quantized sub-scales); llama.cpp's Q4_0/Q4_1/Q5_0/Q8_0 reference rounds with the unrounded scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.core.gguf_blocks import block_type

_ZERO = {"Q8_0": 0, "Q4_0": 8, "Q5_0": 16, "Q4_1": 0, "Q5_1": 0, "Q3_K": 4, "Q4_K": 0, "Q5_K": 0, "Q6_K": 32}
_RANGE = {"Q8_0": (-128, 127), "Q4_0": (0, 15), "Q5_0": (0, 31), "Q4_1": (0, 15), "Q5_1": (0, 31), "Q3_K": (0, 7),
          "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (0, 63)}
# Q4_K / Q5_K sub-block search (llama.cpp's make_qkx2_quants arguments): (nmax, rmin, nstep).
_QKX2 = {"Q4_K": (15, -1.0, 20), "Q5_K": (31, -0.5, 15)}


@dataclass
class BlockGrid:
    """The stored grid of one span of columns (``fit_block_grid``).

    Attributes:
        name: the block type.
        params: the stored parameters of the span, as ``gguf_blocks.pack_rows`` takes them.
        scale: float32 ``[rows, groups]``, per group of the span.
        offset: float32 ``[rows, groups]`` (zeros for the types without a minimum).
    """

    name: str
    params: dict[str, torch.Tensor]
    scale: torch.Tensor
    offset: torch.Tensor

    @property
    def zero(self) -> int:
        return _ZERO[self.name]

    @property
    def code_range(self) -> tuple[int, int]:
        return _RANGE[self.name]


def symmetric(name: str) -> bool:
    """Whether the type's grid is symmetric (no stored minimum)."""
    block_type(name)
    return name not in ("Q4_1", "Q5_1", "Q4_K", "Q5_K")


def code_layout(name: str) -> tuple[int, int, int]:
    """``(zero, lo, hi)`` of block type ``name``: its constant zero point and code range."""
    block_type(name)
    return (_ZERO[name], *_RANGE[name])


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: int, offset: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Nearest codes (as float) of ``w`` on the grid ``scale * (q - zero) + offset``; a zero scale gives ``zero``."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round((w - offset) / safe) + zero
    q = torch.where(scale == 0, torch.full_like(q, float(zero)), q)
    return q.clamp_(lo, hi)


def grid_values(q: torch.Tensor, scale: torch.Tensor, zero: int, offset: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero) + offset`` in float32: ggml's de-quantization of the block types above."""
    return scale * (q - zero) + offset


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dimension, sign kept (the first one on ties)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.zeros_like(x), 1.0 / torch.where(x == 0, torch.ones_like(x), x))


def _fit_q4k_sub_blocks(x: torch.Tensor, weights: torch.Tensor, nmax: int = 15, rmin: float = -1.0,
                        nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last dimension, 32 values) the scale and the minimum ``<= 0`` of ``scale * L + min``
    with ``L`` in 0..nmax minimizing the weighted squared error, over the ``nstep + 1`` candidate inverse scales
    ``(nmax + rmin + k / 10) / (max - min)``, each refitted by weighted least squares (Q4_K's defaults). As in
    llama.cpp, ``min`` is the best minimum found so far: the candidates after an improvement are built on it."""
    xmin = x.min(dim=-1).values.clamp(max=0)
    xmax = x.max(dim=-1).values
    flat = xmax - xmin <= 0
    sw = weights.sum(-1)
    sx = (weights * x).sum(-1)

    def error(scale, mn, levels):
        return (weights * (scale[..., None] * levels + mn[..., None] - x) ** 2).sum(-1)

    def span_of(mn):
        span = xmax - mn
        return torch.where(span > 0, span, torch.ones_like(span))

    best_scale = span_of(xmin) / nmax
    best_min = xmin
    levels = torch.clamp(torch.round((x - xmin[..., None]) * (nmax / span_of(xmin))[..., None]), 0, nmax)
    best_err = error(best_scale, best_min, levels)
    for k in range(nstep + 1):
        iscale = (nmax + rmin + 0.1 * k) / span_of(best_min)
        levels = torch.clamp(torch.round((x - best_min[..., None]) * iscale[..., None]), 0, nmax)
        sl = (weights * levels).sum(-1)
        sl2 = (weights * levels * levels).sum(-1)
        sxl = (weights * levels * x).sum(-1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        scale = (sw * sxl - sx * sl) / det
        mn = (sl2 * sx - sl * sxl) / det
        positive = mn > 0
        scale = torch.where(positive, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), scale)
        mn = torch.where(positive, torch.zeros_like(mn), mn)
        err = error(scale, mn, levels)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, mn, best_min)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, xmin, best_min)
    return best_scale, best_min


def _fit_q6k_sub_blocks(x: torch.Tensor) -> torch.Tensor:
    """Per sub-block (last dimension, 16 values) the signed scale of ``scale * L``, ``L`` in -32..31, starting
    from the signed maximum on ``-32`` and refined by weighted least squares (weights ``x^2``) over the 19
    candidate inverse scales ``-(32 + k / 10) / max``, ``k`` in -9..9; the one with the largest
    ``(sum w x L)^2 / sum w L^2`` wins."""
    nmax = 32
    weights = x * x
    m = _signed_max(x)
    dead = m.abs() < 1e-30
    m = torch.where(dead, torch.ones_like(m), m)
    best_scale = torch.zeros_like(m)
    best_score = torch.full_like(m, -1.0)
    for k in [0] + [k for k in range(-9, 10)]:
        iscale = -(nmax + 0.1 * k) / m
        levels = torch.clamp(torch.round(x * iscale[..., None]), -nmax, nmax - 1)
        sxl = (weights * x * levels).sum(-1)
        sl2 = (weights * levels * levels).sum(-1)
        ok = sl2 > 0
        sl2 = torch.where(ok, sl2, torch.ones_like(sl2))
        score = torch.where(ok, sxl * sxl / sl2, torch.full_like(sxl, -1.0))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sxl / sl2, best_scale)
    return torch.where(dead, torch.zeros_like(best_scale), best_scale)


def _fit_q3k_sub_blocks(x: torch.Tensor) -> torch.Tensor:
    """Per sub-block (last dimension, 16 values) the signed scale of ``scale * L``, ``L`` in -4..3: the levels
    start on the signed maximum at ``-4``; then, up to five passes over the values in order, a value moves to
    the level its least-squares scale asks for when that raises ``(sum w x L)^2 / sum w L^2`` (``w = x^2``).
    The scale is ``sum w x L / sum w L^2``."""
    nmax = 4
    weights = x * x
    m = _signed_max(x)
    dead = m.abs() < 1e-15
    m = torch.where(dead, torch.ones_like(m), m)
    levels = torch.clamp(torch.round(x * (-nmax / m)[..., None]), -nmax, nmax - 1)
    wx = weights * x
    sumlx = (wx * levels).sum(-1)
    suml2 = (weights * levels * levels).sum(-1)
    for _ in range(5):
        for i in range(x.shape[-1]):
            xi, wi, wxi, li = x[..., i], weights[..., i], wx[..., i], levels[..., i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new = torch.clamp(torch.round(xi * sl2 / torch.where(pos, slx, torch.ones_like(slx))), -nmax, nmax - 1)
            slx = slx + wxi * new
            sl2 = sl2 + wi * new * new
            take = pos & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[..., i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
    return torch.where(dead | (suml2 <= 0), torch.zeros_like(scale), scale)


def _fit_qx_weighted(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> torch.Tensor:
    """The scale of each block of ``x`` ``[..., 32]`` on levels ``-nmax..nmax-1`` that minimizes the ``weights``-
    weighted squared error over llama.cpp's candidates (``make_qx_quants`` with an importance matrix): for the
    inverse scales ``-(nmax + k / 10) / m`` (``k`` in -9..9, ``m`` the signed maximum) the levels are rounded and the
    least-squares scale ``sum w x L / sum w L^2`` kept where ``(sum w x L)^2 / sum w L^2`` is largest."""
    m = _signed_max(x)
    best_score = torch.full(m.shape, -1.0, device=x.device)
    best = torch.zeros_like(m)
    for k in (0, *range(-9, 0), *range(1, 10)):
        levels = torch.clamp(torch.round(x * (-(nmax + 0.1 * k) * _safe_inverse(m))[..., None]), -nmax, nmax - 1)
        sumlx, suml2 = (weights * x * levels).sum(-1), (weights * levels * levels).sum(-1)
        safe = torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        score = torch.where(suml2 > 0, sumlx * sumlx / safe, -1.0)
        take = score > best_score
        best = torch.where(take, sumlx / safe, best)
        best_score = torch.where(take, score, best_score)
    return torch.where(m == 0, torch.zeros_like(best), best)


def _fit_simple(name: str, groups: torch.Tensor, importance: torch.Tensor | None = None) -> BlockGrid:
    """Q8_0, Q4_0, Q5_0 (``d`` only) and Q4_1, Q5_1 (``d`` and ``m``) on ``groups`` ``[rows, groups, 32]``;
    with ``importance`` ``[groups, 32]`` (calibrated columns), Q4_0 / Q5_0's ``d`` is the weighted search."""
    zeros = torch.zeros(groups.shape[:2], device=groups.device)
    if importance is not None and name in ("Q4_0", "Q5_0"):
        sigma2 = groups.pow(2).mean(dim=(1, 2), keepdim=True)
        d16 = _half(_fit_qx_weighted(groups, importance * (sigma2 + groups.pow(2)).sqrt(), _ZERO[name]))
        return BlockGrid(name, {"d": d16}, d16.float(), zeros)
    if name in ("Q4_1", "Q5_1"):
        lo, hi = groups.amin(-1), groups.amax(-1)
        d16, m16 = _half((hi - lo) / _RANGE[name][1]), _half(lo)
        return BlockGrid(name, {"d": d16, "m": m16}, d16.float(), m16.float())
    if name == "Q8_0":
        d = groups.abs().amax(-1) / 127
    else:
        d = _signed_max(groups) / -float(_ZERO[name])
    d16 = _half(d)
    return BlockGrid(name, {"d": d16}, d16.float(), zeros)


def _fit_qkx(name: str, x: torch.Tensor) -> BlockGrid:
    """Q4_K / Q5_K on ``x`` ``[rows, supers, 8, 32]``: searched sub-block scales and minimums, then 6-bit."""
    rows = x.shape[0]
    av = x.pow(2).mean(-1, keepdim=True).sqrt()
    scale, mn = _fit_q4k_sub_blocks(x, av + x.abs(), *_QKX2[name])
    mins = -mn  # >= 0
    max_scale, max_min = scale.amax(-1), mins.amax(-1)
    sc = torch.clamp(torch.round(scale * _safe_inverse(max_scale / 63)[..., None]), 0, 63)
    mq = torch.clamp(torch.round(mins * _safe_inverse(max_min / 63)[..., None]), 0, 63)
    d16, dmin16 = _half(max_scale / 63), _half(max_min / 63)
    sub_scale = d16.float()[..., None] * sc
    sub_min = dmin16.float()[..., None] * mq
    params = {"d": d16, "dmin": dmin16, "sc": sc.to(torch.uint8).view(rows, -1),
              "mn": mq.to(torch.uint8).view(rows, -1)}
    return BlockGrid(name, params, sub_scale.view(rows, -1), (-sub_min).view(rows, -1))


def _fit_signed_k(name: str, x: torch.Tensor) -> BlockGrid:
    """Q6_K / Q3_K on ``x`` ``[rows, supers, 16, 16]``: per sub-block signed scales, quantized to int8 against
    ``d = max / -128`` (Q6_K) or to -32..31 against ``d = max / -32`` (Q3_K), ``max`` the signed maximum."""
    rows, supers = x.shape[:2]
    scale = _fit_q6k_sub_blocks(x) if name == "Q6_K" else _fit_q3k_sub_blocks(x)
    levels = 128 if name == "Q6_K" else 32
    max_scale = _signed_max(scale)
    iscale = _safe_inverse(max_scale) * -float(levels)
    sc = torch.clamp(torch.round(scale * iscale[..., None]), -levels, levels - 1)
    if name == "Q3_K":  # llama.cpp leaves a zero block's stored 6-bit scales at 0, i.e. -32
        sc = torch.where((max_scale == 0)[..., None], torch.full_like(sc, -32.0), sc)
    d16 = _half(_safe_inverse(iscale))
    sub_scale = d16.float()[..., None] * sc
    return BlockGrid(name, {"d": d16, "sc": sc.to(torch.int8).view(rows, -1)}, sub_scale.view(rows, -1),
                     torch.zeros(rows, supers * 16, device=x.device))


def fit_block_grid(name: str, w: torch.Tensor, importance: torch.Tensor | None = None) -> BlockGrid:
    """The stored grid of the columns ``w`` ``[rows, n]`` for block type ``name`` (``n`` a multiple of the
    type's ``block_values``; every tensor on ``w``'s device). See the module docstring for each type's rule.
    ``importance`` ``[n]``: how much each input column weighs in the layer's output error (GPTQ's Hessian, the
    statistic of llama.cpp's importance matrix); ``None``: uncalibrated (RTN)."""
    bt = block_type(name)
    w = w.float()
    rows, n = w.shape
    if n % bt.block_values:
        raise ValueError(f"GGUF {name}: a span of {n} columns; expected a multiple of {bt.block_values}")
    if bt.block_values == 32:
        imp = None if importance is None else importance.float().to(w.device).view(n // 32, 32)
        return _fit_simple(name, w.view(rows, n // 32, 32), imp)
    sub = 256 // bt.group_size
    x = w.view(rows, n // 256, sub, bt.group_size)
    return _fit_qkx(name, x) if name in _QKX2 else _fit_signed_k(name, x)


def concat_params(grids: list[BlockGrid]) -> dict[str, torch.Tensor]:
    """The stored parameters of consecutive spans, joined along the columns."""
    return {k: torch.cat([g.params[k] for g in grids], dim=1) for k in grids[0].params}


def rtn_block_quantize(name: str, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Round-to-nearest of ``w`` ``[rows, cols]`` on block type ``name``: ``(codes int32, params)`` for
    ``gguf_blocks.pack_rows``."""
    bt = block_type(name)
    w = w.float()
    rows, cols = w.shape
    if cols % bt.block_values:
        raise ValueError(f"GGUF {name}: {cols} columns; expected a multiple of {bt.block_values}")
    grid = fit_block_grid(name, w)
    lo, hi = grid.code_range
    s = grid.scale.repeat_interleave(bt.group_size, dim=1)
    o = grid.offset.repeat_interleave(bt.group_size, dim=1)
    codes = grid_codes(w, s, grid.zero, o, lo, hi)
    return codes.int(), grid.params
