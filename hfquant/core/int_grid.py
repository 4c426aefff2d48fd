"""``IntGrid``: integer codes on a per-group affine grid (GPTQ / RTN, 2/3/4/8 bits), and the grid policies GPTQ's
column loop quantizes it on.

Stored tensors (``fields``): ``codes`` int32 ``[rows, cols]``, ``scales`` float32 ``[rows, G]``, ``zeros`` int32
``[rows, G]``, ``g_idx`` int32 ``[cols]``; the weight is ``scales[:, g_idx] * (codes - zeros[:, g_idx])``
(``hfquant.core.grids``). ``QuantLinearWeightOnly`` holds it (packed codes, ``hfquant.core.packing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hfquant.core.grids import (
    dequantize,
    dequantize_grouped,
    fit_grid,
    group_bounds,
    quantize_codes,
    rtn_quantize,
)
from hfquant.core.packing import SUPPORTED_BITS
from hfquant.core.weight_format import register_format, WeightFormat


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@register_format
@dataclass(frozen=True)
class IntGrid(WeightFormat):
    """``bits``-bit codes, one scale and zero point per ``group_size`` input columns (``-1``: per output row);
    ``sym`` fixes the zero point at ``2**(bits-1)``; ``observer`` fits each grid (``hfquant.core.grids``)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    observer: str = "minmax"

    kind = "int"
    fields = ("codes", "scales", "zeros", "g_idx")
    keys = ("bits", "group_size", "sym")
    exports = ("hfquant", "gptq", "compressed-tensors")
    reconstructable = True

    @classmethod
    def check_field(cls, key: str, value: Any) -> str | None:
        ok = {"bits": _is_int(value) and value in SUPPORTED_BITS,
              "group_size": _is_int(value) and (value == -1 or value > 0),
              "sym": isinstance(value, bool)}[key]
        return None if ok else {"bits": f"one of {list(SUPPORTED_BITS)}", "group_size": "-1 or a positive integer",
                                "sym": "true or false"}[key]

    @classmethod
    def from_fields(cls, fields: dict, observer: str = "minmax") -> IntGrid:
        return cls(fields["bits"], fields["group_size"], fields.get("sym", True), observer)

    def to_dict(self, method: str) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "method": method}

    def describe(self) -> str:
        return f"{self.bits}-bit codes, {'per-channel' if self.group_size == -1 else f'group_size {self.group_size}'}"

    def stored_bits(self, in_features: int, out_features: int, scale_bits: int = 32) -> int:
        """Packed codes ``out * ceil(in/32) * 32 * bits`` + scales ``out * G * scale_bits`` (the model dtype) +
        zeros ``out * G * 8`` (uint8) + ``g_idx`` ``in * 32`` (int32), with ``G = ceil(in / group_size)``."""
        g = in_features if self.group_size == -1 else self.group_size
        n_groups = -(-in_features // g)
        words = -(-in_features // 32)
        return out_features * words * 32 * self.bits + out_features * n_groups * (scale_bits + 8) + in_features * 32

    def rtn(self, w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        return rtn_quantize(w.float(), self.bits, self.group_size, self.sym, self.observer, scale_dtype=scale_dtype)

    def solver_grids(self, w: torch.Tensor, perm: torch.Tensor | None, static: bool, hinv: torch.Tensor,
                     scale_dtype: torch.dtype | None, h_diag: torch.Tensor | None = None):
        rows, cols = w.shape
        g = cols if self.group_size == -1 else self.group_size
        # The "hessian" observer weighs each column by its GPTQ loss weight 1 / U_jj^2 (processing order).
        importance = hinv.diagonal().pow(-2) if self.observer == "hessian" else None
        if static:  # fitted on the weight in its original column order, before any update
            if importance is not None and perm is not None:
                importance = importance[torch.argsort(perm)]
            return StaticGroupGrids(w, g, perm, (self, scale_dtype), importance)
        return FittedGroupGrids(rows, cols, g, w.device, (self, scale_dtype), importance)

    def fit(self, part: torch.Tensor, importance: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None):
        """One grid per row of ``part`` (the columns of one group), by this format's observer; the scales rounded to
        ``scale_dtype`` (``hfquant.core.grids.fit_grid``)."""
        return fit_grid(part, self.bits, self.sym, self.observer, scale_dtype=scale_dtype, importance=importance)

    def dequantize(self, stored: tuple[torch.Tensor, ...], cols: int) -> torch.Tensor:
        return dequantize_grouped(*stored)

    def empty(self, rows: int, cols: int, device) -> tuple[torch.Tensor, ...]:
        n_groups = len(group_bounds(cols, self.group_size))
        return (torch.empty(rows, cols, dtype=torch.int32, device=device),
                torch.empty(rows, n_groups, device=device),
                torch.empty(rows, n_groups, dtype=torch.int32, device=device),
                torch.empty(cols, dtype=torch.int32, device=device))

    def join_rows(self, parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        codes, scales, zeros = (torch.cat([p[i] for p in parts]) for i in range(3))
        return codes, scales, zeros, parts[0][3]  # g_idx: one per column, the same in every slab

    def split_rows(self, stored: tuple[torch.Tensor, ...], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        codes, scales, zeros, g_idx = stored
        return codes[r0:r1], scales[r0:r1], zeros[r0:r1], g_idx


@dataclass(frozen=True)
class ColumnSegment:
    """The grids of a run of consecutive columns (processing order) for GPTQ's fused column loop
    (``hfquant.core.gptq_triton``): ``scale``, ``zero`` and ``offset`` (``None``: none) ``[rows, n]`` float32, code range
    ``lo..hi``; column ``t``'s codes are ``clamp(round((w - offset) / scale) + zero, lo, hi)``."""

    scale: torch.Tensor
    zero: torch.Tensor
    offset: torch.Tensor | None
    lo: int
    hi: int


class GroupGrids:
    """GPTQ's grid policy for one solve: which grid (scale, zero) each column is quantized on, and the grids to store.

    ``scales`` (float32) and ``zeros`` ``[rows, G]`` hold every group's grid once all columns are done;
    ``column_grid(j, block)`` gives the quantizer of column ``j`` (processing order) when its turn comes in
    ``block`` (``hfquant.core.gptq``), ``groups()`` the group of each column in processing order, and
    ``stored(codes, g_idx)`` the format's stored tensors once every column has its codes. ``grid_of``: the
    ``(IntGrid, scale_dtype)`` whose grids are fitted (``None`` for a policy of another format)."""

    def __init__(self, rows: int, cols: int, g: int, device, grid_of: tuple[IntGrid, torch.dtype | None] | None):
        self.cols, self.g, self.device = cols, g, device
        self.format, self.scale_dtype = grid_of or (None, None)
        n_groups = (cols + g - 1) // g
        self.scales = torch.zeros(rows, n_groups, device=device)
        self.zeros = torch.zeros(rows, n_groups, device=device)

    def grid(self, j: int, block) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def group_of(self, j: int) -> int:
        """The group of column ``j`` (processing order)."""
        return j // self.g

    def fits_at(self, j: int) -> bool:
        """Whether a grid is fitted when column ``j`` comes up (on the weights as updated so far)."""
        return False

    def segment_end(self, j: int, end: int) -> int:
        """The first column after ``j`` and before ``end`` where a grid is fitted, else ``end``: columns ``j`` up to
        it can be quantized in one go on grids known at ``j`` (``segment``)."""
        return next((c for c in range(j + 1, end) if self.fits_at(c)), end)

    def segment(self, j1: int, j2: int, block) -> ColumnSegment:
        """The grids of columns ``j1:j2`` (fitting column ``j1``'s if it is due), for the fused column loop."""
        self.grid(j1, block)
        ks = torch.tensor([self.group_of(j) for j in range(j1, j2)], device=self.device)
        return ColumnSegment(self.scales[:, ks], self.zeros[:, ks], None, 0, 2**self.format.bits - 1)

    def column_grid(self, j: int, block):
        """Column -> ``(codes, values)`` on column ``j``'s grid: ``scale * (q - zero)``, ``q`` in ``[0, maxq]``."""
        scale, zero = self.grid(j, block)
        maxq = 2**self.format.bits - 1

        def quantize(col):
            q = quantize_codes(col, scale, zero, maxq)
            return q, dequantize(q, scale, zero)
        return quantize

    def groups(self) -> torch.Tensor:
        raise NotImplementedError

    def stored(self, codes: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return codes.int(), self.scales, self.zeros.int(), g_idx.int()


class OriginalGroups(GroupGrids):
    """Groups of the *original* columns: with act-order (``perm``) a column is quantized on the grid of its original
    group, so ``g_idx`` stays monotone."""

    def _set_order(self, perm: torch.Tensor | None) -> None:
        self.perm = perm
        self.orig_col = perm.tolist() if perm is not None else list(range(self.cols))

    def group_of(self, j: int) -> int:
        """The group of column ``j`` (processing order)."""
        return self.orig_col[j] // self.g

    def groups(self) -> torch.Tensor:
        by_orig = torch.arange(self.cols, device=self.device) // self.g
        return by_orig[self.perm] if self.perm is not None else by_orig


class StaticGroupGrids(OriginalGroups):
    """``static_groups``: groups of the original columns, each grid fitted up front on the weight before any
    update."""

    def __init__(self, w: torch.Tensor, g: int, perm: torch.Tensor | None, grid_of: tuple,
                 importance: torch.Tensor | None = None):
        rows, cols = w.shape
        super().__init__(rows, cols, g, w.device, grid_of)
        for k, (a, b) in enumerate(group_bounds(cols, g)):
            grid = self.format.fit(w[:, a:b], None if importance is None else importance[a:b], self.scale_dtype)
            self.scales[:, k], self.zeros[:, k] = grid.scale, grid.zero
        self._set_order(perm)

    def grid(self, j: int, block) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.group_of(j)
        return self.scales[:, k], self.zeros[:, k]


class FittedGroupGrids(GroupGrids):
    """Default groups: consecutive columns in processing order; a group's grid is fitted when its first column
    comes up, on the weights as updated so far, including the columns of the group that spill past the end of
    the current block (``block.updated_columns``). The last group may be partial."""

    def __init__(self, rows: int, cols: int, g: int, device, grid_of: tuple, importance: torch.Tensor | None = None):
        super().__init__(rows, cols, g, device, grid_of)
        self.scale = self.zero = None
        self.importance = importance

    def fits_at(self, j: int) -> bool:
        return j % self.g == 0

    def grid(self, j: int, block) -> tuple[torch.Tensor, torch.Tensor]:
        if j % self.g == 0:
            end = min(j + self.g, self.cols)
            part = block.updated_columns(j, end)
            grid = self.format.fit(part, None if self.importance is None else self.importance[j:end], self.scale_dtype)
            self.scale, self.zero = grid.scale, grid.zero
            self.scales[:, j // self.g], self.zeros[:, j // self.g] = self.scale, self.zero
        return self.scale, self.zero

    def groups(self) -> torch.Tensor:
        return torch.arange(self.cols, device=self.device) // self.g
