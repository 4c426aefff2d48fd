"""Uniform integer grids and round-to-nearest (RTN) weight quantization.

A grid maps a float weight ``w`` to an unsigned code ``q`` in ``[0, 2**bits - 1]``::

    q = clamp(round(w / scale) + zero, 0, maxq)        w_hat = scale * (q - zero)

``fit_grid`` follows the GPTQ reference quantizer (IST-DASLab/gptq ``quant.py``): per row,
``xmin = min(row.min(), 0)`` and ``xmax = max(row.max(), 0)`` so zero is always representable;
symmetric grids use ``xmax = max(|xmin|, xmax)`` with the zero point fixed at ``(maxq + 1) / 2``
(8 for 4 bits, so the range is ``[-8, 7] * scale = [-xmax * 16/15, xmax * 14/15]``); asymmetric grids
use ``zero = round(-xmin / scale)``. An all-zero row gets the range ``[-1, 1]``.

``observer="mse"`` additionally shrinks the range by ``p = 1 - i / grid`` for ``i < maxshrink * grid``
and keeps, per row, the candidate with the smallest ``sum |w - w_hat| ** norm`` (the reference's
``mse=True`` option, grid 100, maxshrink 0.8, norm 2.4: ``MSE_GRID``, ``MSE_MAXSHRINK``, ``MSE_NORM``).

``observer="hessian"`` is a weighted grid search (``search_grid``): per row, the candidate grid with the smallest
``sum_j importance_j * (w_j - w_hat_j) ** 2``, where ``importance`` weighs the input columns (the Hessian's
diagonal, or GPTQ's own per-column loss weight ``1 / U_jj ** 2``; uniform when not given). The idea of
weighing a clipping search by input importance is llm-compressor's ``imatrix_mse`` observer and llama.cpp's
imatrix; this search is hfquant's own. Asymmetric grids search the two ends of the range independently
(``xmin * p_lo``, ``xmax * p_hi``). Symmetric grids search both orientations of the signed grid: the row's
largest-magnitude weight ``m`` on code 0 (``scale = -m / 2**(bits-1) * p``, llama.cpp's Q4_0 choice, which
may make the scale negative) or on code ``maxq`` (``scale = m / (2**(bits-1) - 1) * p``), so the longer half
of the asymmetric code range ``[-2**(bits-1), 2**(bits-1) - 1]`` can face the larger weights; the reference
minmax grid is a candidate too. A negative
scale is valid in every format hfquant writes (``w_hat = scale * (q - zero)`` whatever the sign).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OBSERVERS = ("minmax", "mse", "hessian")

# The "mse" observer's range-shrink search, the GPTQ reference quantizer's constants: the range shrunk by
# p = 1 - i / MSE_GRID for i < MSE_MAXSHRINK * MSE_GRID (p = 1 down to 0.21), each candidate scored by
# sum |w - w_hat| ** MSE_NORM.
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.8, 2.4

# The weighted search (``search_grid``) is coarse to fine: first the range shrunk by p in COARSE_SHRINK (for symmetric
# grids in both orientations, plus the reference grid; for asymmetric grids every pair (p_lo, p_hi)), then, per
# row, the neighbours of the best coarse candidate at FINE_STEP (SYM_FINE steps either side; the asymmetric pair
# one step either way in each end). Shrinks stay in [MIN_SHRINK, 1].
SYM_COARSE = tuple(1 - i / 20 for i in range(11))   # 1.0, 0.95, ..., 0.5
ASYM_COARSE = tuple(1 - i / 10 for i in range(5))   # 1.0, 0.9, ..., 0.6
SYM_FINE, SYM_FINE_STEP, ASYM_FINE_STEP, MIN_SHRINK = 4, 0.01, 0.05, 0.5


@dataclass
class QuantGrid:
    """Per-row grid parameters: ``scale`` and integer-valued ``zero``, both float32 of shape ``[rows]``."""

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int


def stored_scale(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """``scale`` as it will be stored in ``scale_dtype`` (rounded, its magnitude kept above the dtype's smallest
    normal so a float16 scale never flushes to zero; the sign is kept), returned in float32. float32 and ``None``
    leave it as it is."""
    if scale_dtype is None or scale_dtype == torch.float32:
        return scale
    tiny = torch.finfo(scale_dtype).tiny
    return torch.where(scale < 0, scale.clamp(max=-tiny), scale.clamp(min=tiny)).to(scale_dtype).float()


def _grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool,
                     scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    scale = stored_scale((xmax - xmin) / maxq, scale_dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    return xmin, xmax


def fit_grid(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    observer: str = "minmax",
    *,
    scale_dtype: torch.dtype | None = None,
    importance: torch.Tensor | None = None,
) -> QuantGrid:
    """Fit one grid per row of ``w`` (shape ``[rows, cols]``, the columns of one group).

    ``scale_dtype``: the scales are rounded to the dtype they will be stored in before the zero points (and
    the observer's errors) are computed, so the grid is exactly the stored one. ``importance``: ``[cols]`` column
    weights of the ``"hessian"`` observer (ignored by the others)."""
    w = w.float()
    maxq = 2**bits - 1
    if observer == "hessian":
        return search_grid(w, bits, sym, importance, scale_dtype=scale_dtype)
    xmin, xmax = _range(w, sym)
    scale, zero = _grid_from_range(xmin, xmax, maxq, sym, scale_dtype)
    if observer == "mse":
        best = torch.full_like(scale, float("inf"))
        for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
            p = 1 - i / MSE_GRID
            s1, z1 = _grid_from_range(p * xmin, p * xmax, maxq, sym, scale_dtype)
            q = torch.clamp(torch.round(w / s1[:, None]) + z1[:, None], 0, maxq)
            err = (s1[:, None] * (q - z1[:, None]) - w).abs_().pow_(MSE_NORM).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    elif observer != "minmax":
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    return QuantGrid(scale=scale, zero=zero, maxq=maxq)


def _eval_grids(w: torch.Tensor, imp: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int,
                chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the smallest ``sum_j imp_j (w_j - w_hat_j)^2`` over the candidate grids ``scales``/``zeros``
    ``[rows, C]``, and its candidate index."""
    best = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_i = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
    for c0 in range(0, scales.shape[1], chunk):
        s, z = scales[:, c0:c0 + chunk, None], zeros[:, c0:c0 + chunk, None]
        t = w[:, None, :] / s
        t.round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s).sub_(w[:, None, :]).square_()
        e, i = (t @ imp).min(dim=1)
        better = e < best
        best = torch.where(better, e, best)
        best_i = torch.where(better, i + c0, best_i)
    return best, best_i


def _pick(scales: torch.Tensor, zeros: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scales.gather(1, i[:, None])[:, 0], zeros.gather(1, i[:, None])[:, 0]


def _search_sym(w: torch.Tensor, imp: torch.Tensor, maxq: int, scale_dtype) -> QuantGrid:
    half = (maxq + 1) // 2
    m = w.gather(1, w.abs().argmax(dim=1, keepdim=True))  # signed largest-magnitude weight, [rows, 1]
    m = torch.where(m == 0, torch.ones_like(m), m)
    # Orientation o: the largest weight on code 0 (scale -m / half, may be negative) or on code maxq.
    unit = torch.cat([-m / half, m / (half - 1)], dim=1) if half > 1 else -m / half   # [rows, O]
    p = torch.tensor(SYM_COARSE, device=w.device)
    coarse = (unit[:, :, None] * p).flatten(1)
    scales = stored_scale(torch.cat([coarse, 2 * m.abs() / maxq], dim=1), scale_dtype)  # + the reference grid
    zeros = torch.full_like(scales, float(half))
    err, i = _eval_grids(w, imp, scales, zeros, maxq)
    scale, zero = _pick(scales, zeros, i)
    # Refine around the best coarse shrink of the best orientation (rows that chose the reference keep it).
    n = len(SYM_COARSE)
    o, k = (i // n).clamp(max=unit.shape[1] - 1), i % n
    steps = torch.tensor([d for d in range(-SYM_FINE, SYM_FINE + 1) if d], device=w.device) * SYM_FINE_STEP
    pf = (p[k][:, None] + steps).clamp(MIN_SHRINK, 1.0)
    fine = stored_scale(unit.gather(1, o[:, None]) * pf, scale_dtype)
    ferr, fi = _eval_grids(w, imp, fine, torch.full_like(fine, float(half)), maxq)
    better = (ferr < err) & (i < coarse.shape[1])
    return QuantGrid(scale=torch.where(better, fine.gather(1, fi[:, None])[:, 0], scale), zero=zero, maxq=maxq)


def _asym_grids(xmin, xmax, plo, phi, maxq, scale_dtype):
    lo, hi = xmin[:, None] * plo, xmax[:, None] * phi
    scales = stored_scale((hi - lo) / maxq, scale_dtype)
    return scales, torch.round(-lo / scales).clamp(0, maxq)


def _search_asym(w: torch.Tensor, imp: torch.Tensor, maxq: int, scale_dtype) -> QuantGrid:
    xmin, xmax = _range(w, sym=False)
    p = torch.tensor(ASYM_COARSE, device=w.device)
    plo, phi = p.repeat_interleave(len(p)), p.repeat(len(p))  # every pair; (1, 1) is the reference grid
    scales, zeros = _asym_grids(xmin, xmax, plo[None, :], phi[None, :], maxq, scale_dtype)
    err, i = _eval_grids(w, imp, scales, zeros, maxq)
    scale, zero = _pick(scales, zeros, i)
    d = torch.tensor([-1.0, 0.0, 1.0], device=w.device) * ASYM_FINE_STEP
    dlo, dhi = d.repeat_interleave(3), d.repeat(3)
    keep = (dlo != 0) | (dhi != 0)
    flo = (plo[i][:, None] + dlo[keep]).clamp(MIN_SHRINK, 1.0)
    fhi = (phi[i][:, None] + dhi[keep]).clamp(MIN_SHRINK, 1.0)
    fs, fz = _asym_grids(xmin, xmax, flo, fhi, maxq, scale_dtype)
    ferr, fi = _eval_grids(w, imp, fs, fz, maxq)
    better = ferr < err
    fscale, fzero = _pick(fs, fz, fi)
    return QuantGrid(scale=torch.where(better, fscale, scale), zero=torch.where(better, fzero, zero), maxq=maxq)


def search_grid(w: torch.Tensor, bits: int, sym: bool, importance: torch.Tensor | None = None, *,
                scale_dtype: torch.dtype | None = None) -> QuantGrid:
    """The ``"hessian"`` observer (module docstring): per row of ``w`` ``[rows, cols]``, the candidate grid with
    the smallest importance-weighted squared error. ``importance``: ``[cols]``, non-negative (uniform if ``None``)."""
    w = w.float()
    maxq = 2**bits - 1
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float().to(w.device)
    return (_search_sym if sym else _search_asym)(w, imp, maxq, scale_dtype)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid; ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)``."""
    return scale * (q - zero)


def dequantize_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``scales[:, g_idx] * (codes - zeros[:, g_idx])`` from per-group parameters."""
    g = g_idx.long()
    return dequantize(codes.float(), scales.float()[:, g], zeros.float()[:, g])


def group_bounds(cols: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges of the groups; the last one is partial when ``group_size`` does not divide ``cols``."""
    g = cols if group_size == -1 else group_size
    return [(i, min(i + g, cols)) for i in range(0, cols, g)]


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, observer: str = "minmax",
                 scale_dtype: torch.dtype | None = None):
    """Round-to-nearest quantization of ``w`` ``[rows, cols]`` with groups along the columns.

    Returns ``(codes [rows, cols] int32, scales [rows, G] float32, zeros [rows, G] int32, g_idx [cols] int32)``,
    on ``w``'s device. ``scale_dtype``: see ``fit_grid``.
    """
    w = w.float()
    rows, cols = w.shape
    bounds = group_bounds(cols, group_size)
    codes = torch.empty(rows, cols, dtype=torch.int32, device=w.device)
    scales = torch.empty(rows, len(bounds), device=w.device)
    zeros = torch.empty(rows, len(bounds), dtype=torch.int32, device=w.device)
    g_idx = torch.empty(cols, dtype=torch.int32, device=w.device)
    for k, (a, b) in enumerate(bounds):
        g = fit_grid(w[:, a:b], bits, sym, observer, scale_dtype=scale_dtype)
        codes[:, a:b] = quantize_codes(w[:, a:b], g.scale[:, None], g.zero[:, None], g.maxq).int()
        scales[:, k] = g.scale
        zeros[:, k] = g.zero.int()
        g_idx[a:b] = k
    return codes, scales, zeros, g_idx
