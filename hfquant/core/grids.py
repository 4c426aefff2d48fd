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
``mse=True`` option, grid 100, maxshrink 0.8, norm 2.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OBSERVERS = ("minmax", "mse")


@dataclass
class QuantGrid:
    """Per-row grid parameters: ``scale`` and integer-valued ``zero``, both float32 of shape ``[rows]``."""

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int


def stored_scale(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """``scale`` as it will be stored in ``scale_dtype`` (rounded, kept above the dtype's smallest normal so a
    float16 scale never flushes to zero), returned in float32. float32 and ``None`` leave it as it is."""
    if scale_dtype is None or scale_dtype == torch.float32:
        return scale
    return scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()


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
    grid: int = 100,
    maxshrink: float = 0.8,
    norm: float = 2.4,
    scale_dtype: torch.dtype | None = None,
) -> QuantGrid:
    """Fit one grid per row of ``w`` (shape ``[rows, cols]``, the columns of one group).

    ``scale_dtype``: the scales are rounded to the dtype they will be stored in before the zero points (and
    the observer's errors) are computed, so the grid is exactly the stored one."""
    w = w.float()
    maxq = 2**bits - 1
    xmin, xmax = _range(w, sym)
    scale, zero = _grid_from_range(xmin, xmax, maxq, sym, scale_dtype)
    if observer == "mse":
        best = torch.full_like(scale, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s1, z1 = _grid_from_range(p * xmin, p * xmax, maxq, sym, scale_dtype)
            q = torch.clamp(torch.round(w / s1[:, None]) + z1[:, None], 0, maxq)
            err = (s1[:, None] * (q - z1[:, None]) - w).abs_().pow_(norm).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    elif observer != "minmax":
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    return QuantGrid(scale=scale, zero=zero, maxq=maxq)


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
