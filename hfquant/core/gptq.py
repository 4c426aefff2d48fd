"""GPTQ: post-training weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323). This follows the reference implementation
(IST-DASLab/gptq ``gptq.py``, ``fasterquant``) step by step:

1. ``H = 2/n * sum X^T X`` over the layer inputs (accumulated by the caller; only its shape of
   ``[cols, cols]`` and relative scale matter here).
2. Dead inputs (``diag(H) == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``.
3. Act-order: columns are processed by decreasing ``diag(H)``.
4. Dampening ``H += damp * mean(diag(H)) * I``; ``Hinv = chol(chol_inverse(chol(H)))^T`` is the upper
   Cholesky factor of ``H^-1``.
5. Columns are quantized one at a time; the rounding error ``err = (w - q) / Hinv[i, i]`` is spread
   over the remaining columns of the block, ``W[:, i:] -= err Hinv[i, i:]``, and over later blocks
   lazily, ``W[:, i2:] -= Err @ Hinv[i1:i2, i2:]``.

Differences from the reference, each deliberate:

* Group grids are fitted on the weights *as updated so far*, also when a group starts in the middle
  of a block or spills past its end (the reference reads the outer ``W``, which misses the in-block
  updates unless the group size is a multiple of the block size). Partial last groups are allowed.
* A Hessian that is not positive definite is retried with 10x the damping, up to ``max_damp``; the
  damping used and the number of retries are returned. If every try fails the caller gets ``None``
  and falls back to RTN.
* The Cholesky factorisations run in float64 (cheap at these sizes) for stability.

Layout: ``prepare_hessian`` does steps 2-4 once per input (``HessianFactor``, shared by the Linears reading
it); ``gptq_solve`` does step 5 for one weight, in parts: a group grid policy (``_StaticGroupGrids``, every
grid fitted up front on the original columns, or ``_FittedGroupGrids``, each fitted when its group starts),
the lazy-update block (``_Block``: one column's quantization and in-block update, the columns a group spills
past the block's end, the lazy update of later blocks), the column loop over the blocks
(``_quantize_columns``), and the return to the original column order (``_restore_column_order``).
``gptq_quantize`` is both in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hfquant.core.gguf_blocks import block_type, dequantize_codes
from hfquant.core.gguf_grids import (
    BlockGrid,
    code_layout,
    concat_params,
    fit_block_grid,
    grid_codes,
    grid_values,
)
from hfquant.core.grids import dequantize, dequantize_grouped, fit_grid, group_bounds, quantize_codes


@dataclass
class GPTQResult:
    """Outcome of one GPTQ solve.

    Attributes:
        codes: int32 ``[rows, cols]`` integer codes in the original column order.
        scales: float32 ``[rows, G]`` group scales, ``G = ceil(cols / group_size)``.
        zeros: int32 ``[rows, G]`` group zero points.
        g_idx: int32 ``[cols]`` group of each input column (not monotone for act-order without static groups).
        row_losses: float32 ``[rows]``, ``sum_i (w - q)^2 / Hinv_ii^2 / 2`` per row (the reference's error).
        damp: damping fraction finally used.
        retries: how many times the damping was raised.
        gguf_type: the GGUF block type the codes are on (``hfquant.core.gguf_grids``), or ``None``.
        params: with ``gguf_type``, the stored block parameters (``gguf_blocks.pack_rows``'s ``params``); the
            codes are then in the type's own range (signed for Q8_0) and ``zeros`` is the type's constant zero.
        pre: float32 ``[rows, cols]`` (original column order): each weight as GPTQ's updates left it just before it
            was rounded, so ``codes == clamp(round(pre / scale) + zero)``; block reconstruction starts from it.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    row_losses: torch.Tensor
    damp: float
    retries: int
    gguf_type: str | None = None
    params: dict | None = None
    pre: torch.Tensor | None = None

    @property
    def loss(self) -> float:
        return float(self.row_losses.sum())

    def dequantized(self) -> torch.Tensor:
        """The fake-quantized weight ``scale[g_idx] * (codes - zero[g_idx])`` in float32 (for a GGUF type, ggml's
        de-quantization of the stored blocks)."""
        if self.gguf_type is not None:
            return dequantize_codes(self.gguf_type, self.codes, self.params)
        return dequantize_grouped(self.codes, self.scales, self.zeros, self.g_idx)


def inverse_hessian_factor(h: torch.Tensor, damp_percent: float, max_damp: float = 10.0):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, raising the damping until it works.

    Returns ``(factor or None, damp_used, retries)``.
    """
    h64 = h.double()
    mean_diag = torch.diagonal(h64).mean()
    eye = torch.eye(h64.shape[0], dtype=torch.float64, device=h.device)
    damp, retries = damp_percent, 0
    while damp <= max_damp:
        chol, info = torch.linalg.cholesky_ex(h64 + damp * mean_diag * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper.float(), damp, retries
        retries += 1
        damp = damp * 10 if damp > 0 else 0.01
    return None, damp, retries


@dataclass
class HessianFactor:
    """What the solves of every Linear reading one input share: computed once per input (``prepare_hessian``).

    Attributes:
        hinv: float32 upper Cholesky factor of the dampened ``H^-1`` (in act-order column order).
        perm: the act-order column permutation, or ``None``.
        dead: bool ``[cols]``, inputs with ``diag(H) == 0`` (their weight columns are zeroed).
        damp: damping fraction finally used.
        retries: how many times the damping was raised.
    """

    hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float
    retries: int


def prepare_hessian(hessian: torch.Tensor, *, act_order: bool = False, damp_percent: float = 0.01) -> HessianFactor | None:
    """Steps 2-4 above for one input Hessian ``[cols, cols]``; ``None`` when no damping makes it positive definite."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        h = h[perm][:, perm]
    hinv, damp, retries = inverse_hessian_factor(h, damp_percent)
    if hinv is None:
        return None
    return HessianFactor(hinv, perm, dead, damp, retries)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    observer: str = "minmax",
    scale_dtype: torch.dtype | None = None,
    gguf_type: str | None = None,
) -> GPTQResult | None:
    """Quantize ``weight`` (``[rows, cols]``) given the input Hessian ``hessian`` (``[cols, cols]``).

    Rows are independent given ``H``, so weights of several Linears that read the same input
    (q/k/v, gate/up) can be concatenated along rows and solved at once, or solved one after another on
    one ``prepare_hessian`` factor (``gptq_solve``), with the same result up to float rounding.

    Returns ``None`` when no damping up to the maximum makes ``H`` positive definite.
    """
    factor = prepare_hessian(hessian, act_order=act_order, damp_percent=damp_percent)
    if factor is None:
        return None
    return gptq_solve(weight, factor, bits=bits, group_size=group_size, sym=sym, static_groups=static_groups,
                      block_size=block_size, observer=observer, scale_dtype=scale_dtype, gguf_type=gguf_type)


def gptq_solve(
    weight: torch.Tensor,
    factor: HessianFactor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    static_groups: bool = False,
    block_size: int = 128,
    observer: str = "minmax",
    scale_dtype: torch.dtype | None = None,
    gguf_type: str | None = None,
    cross: torch.Tensor | None = None,
    cross_alpha: float = 0.25,
) -> GPTQResult:
    """Step 5 above for ``weight`` ``[rows, cols]`` on a prepared Hessian factor.

    ``cross``: GPTAQ's asymmetric calibration (``asymmetric_target``): ``2/n sum (X_float - X)^T X`` ``[cols, cols]``
    of this input, scaled as the Hessian; the weight is first moved to ``asymmetric_target``'s target, with
    strength ``cross_alpha``, and the solve (grids included) quantizes that.

    ``scale_dtype``: the dtype the scales are stored in (the model's, e.g. bfloat16). Each group's scale is
    rounded to it before its codes are chosen, so the codes, the losses and ``dequantized()`` are those of
    the stored grid. Every tensor is created on ``weight``'s device.

    ``gguf_type``: quantize onto that GGUF block type's stored grid instead (``hfquant.core.gguf_grids``); it
    fixes the group size and the grid, so ``bits``, ``group_size``, ``sym``, ``observer`` and ``scale_dtype`` are
    not used. Act-order needs ``static_groups`` then (a GGUF block holds consecutive columns).
    """
    w = weight.float().clone()
    rows, cols = w.shape
    device = w.device
    g = cols if group_size == -1 else group_size
    perm = factor.perm.to(device) if factor.perm is not None else None
    hinv = factor.hinv.to(device)
    w[:, factor.dead.to(device)] = 0
    if cross is not None:
        w = asymmetric_target(w, cross, factor, cross_alpha)

    if gguf_type is not None:
        if perm is not None and not static_groups:
            raise ValueError(f"GGUF {gguf_type}: act-order needs static_groups (a GGUF block holds consecutive columns)")
        grids = _BlockTypeGrids(w, gguf_type, perm, static_groups)
    else:
        # The "hessian" observer weighs each column by its GPTQ loss weight 1 / U_jj^2 (processing order).
        importance = hinv.diagonal().pow(-2) if observer == "hessian" else None
        fit = _GridFit(bits, sym, observer, scale_dtype)
        # Static grids are fitted on the weight in its original column order, before any update.
        if static_groups:
            if importance is not None and perm is not None:
                importance = importance[torch.argsort(perm)]
            grids = _StaticGroupGrids(w, g, perm, fit, importance)
        else:
            grids = _FittedGroupGrids(rows, cols, g, device, fit, importance)
    if perm is not None:
        w = w[:, perm]
    codes, losses, pre = _quantize_columns(w, hinv, grids, block_size)
    codes, g_idx = _restore_column_order(codes, grids.groups(), perm)
    if perm is not None:
        pre = pre[:, torch.argsort(perm)]
    return GPTQResult(
        codes=codes.int(),
        scales=grids.scales,
        zeros=grids.zeros.int(),
        g_idx=g_idx.int(),
        row_losses=losses,
        damp=factor.damp,
        retries=factor.retries,
        gguf_type=gguf_type,
        params=grids.params() if gguf_type is not None else None,
        pre=pre,
    )


def join_rows(parts: list[GPTQResult | None]) -> GPTQResult | None:
    """One weight's result from the results of its consecutive row slabs, solved on the same factor (GPTQ treats
    rows independently, so this is the whole solve's result); ``None`` if a slab has none."""
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def rows(attr):
        return torch.cat([getattr(p, attr) for p in parts])
    return replace(first, codes=rows("codes"), scales=rows("scales"), zeros=rows("zeros"), row_losses=rows("row_losses"),
                   params=None if first.params is None else {k: torch.cat([p.params[k] for p in parts]) for k in first.params},
                   pre=rows("pre") if all(p.pre is not None for p in parts) else None)


def asymmetric_target(w: torch.Tensor, cross: torch.Tensor, factor: HessianFactor, alpha: float) -> torch.Tensor:
    """The weight GPTQ should quantize to match the *float* model's outputs (asymmetric calibration).

    GPTAQ (Li, Yin, Bhattacharya, Wang, Panda, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
    Calibration", ICML 2025, arXiv 2504.02692) minimizes ``||X Q^T - X_float W^T||^2``, where the rows of ``X``
    are the tokens of the layer's input in the quantized model and ``X_float`` the same tokens in the float model.
    With ``H = X^T X`` and ``C = (X_float - X)^T X`` (both ``[cols, cols]``, scaled alike), setting the gradient to
    zero gives the unquantized optimum ``W' = W + W C H^-1``, and the objective is ``||X (Q - W')^T||^2`` plus a
    constant: GPTQ run on ``W'`` with the usual ``H`` is GPTQ on GPTAQ's objective. (The paper folds the same
    correction into the column loop; moving the target first lets the grids be fitted on the target.)
    ``alpha`` scales the correction (the paper's code uses 0.25); ``H^-1`` is the dampened one of ``factor``
    (``U^T U``, ``U = factor.hinv`` in processing order). Dead input columns stay zero.
    """
    dead = factor.dead.to(w.device)
    c = cross.float().to(w.device)
    hinv = factor.hinv.to(w.device)
    if factor.perm is not None:
        perm = factor.perm.to(w.device)
        adj = ((w[:, perm] @ c[perm][:, perm]) @ hinv.t()) @ hinv
        adj = adj[:, torch.argsort(perm)]
    else:
        adj = ((w @ c) @ hinv.t()) @ hinv
    out = w + alpha * adj
    out[:, dead] = 0
    return out


# ---- step 5, in parts: grid policy, lazy-update blocks, column loop, column order ------------------------


@dataclass
class _GridFit:
    """How a group's grid is fitted (``fit_grid``'s settings for one solve)."""

    bits: int
    sym: bool
    observer: str
    scale_dtype: torch.dtype | None

    def __call__(self, part: torch.Tensor, importance: torch.Tensor | None = None):
        return fit_grid(part, self.bits, self.sym, self.observer, scale_dtype=self.scale_dtype, importance=importance)


class _Block:
    """One lazy-update block: columns ``i1:i2`` (processing order) of the working weight ``w`` ``[rows, cols]``.

    The block's columns are quantized one at a time (``quantize_column``) on a copy ``w1`` that takes each
    column's error at once, ``W[:, i:] -= err Hinv[i, i:]`` within the block; the errors are kept in ``err1``
    and reach the columns after the block only in ``lazy_update``, ``W[:, i2:] -= Err @ Hinv[i1:i2, i2:]``.
    """

    def __init__(self, w: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int):
        self.w, self.hinv, self.i1, self.i2 = w, hinv, i1, i2
        self.w1 = w[:, i1:i2].clone()
        self.err1 = torch.zeros_like(self.w1)
        self.hinv1 = hinv[i1:i2, i1:i2]

    def updated_columns(self, j: int, end: int) -> torch.Tensor:
        """Columns ``j:end`` (``i1 <= j < i2``) as updated by every column quantized before ``j``.

        Columns past the block's end (a group spilling over it) still owe the lazy update from columns
        ``i1..j-1``, which is applied here to a copy."""
        i = j - self.i1
        part = self.w1[:, i : end - self.i1]
        if end > self.i2:
            rest = self.w[:, self.i2:end] - self.err1[:, :i] @ self.hinv[self.i1:j, self.i2:end]
            part = torch.cat([part, rest], dim=1)
        return part

    def quantize_column(self, j: int, grid):
        """Quantize column ``j`` on ``grid`` (a callable: column -> ``(codes, values)``) and spread its error over
        the block's later columns.

        Returns ``(codes, loss)``: the column's codes (as float) and its per-row loss
        ``(w - q)^2 / Hinv_jj^2 / 2``."""
        i = j - self.i1
        col = self.w1[:, i]
        d = self.hinv1[i, i]
        q, dq = grid(col)
        loss = (col - dq).pow(2) / d**2 / 2
        err = (col - dq) / d
        self.w1[:, i:] -= err[:, None] * self.hinv1[i, i:][None, :]
        self.err1[:, i] = err
        return q, loss

    def lazy_update(self) -> None:
        """Apply the block's errors to every later column of ``w``."""
        self.w[:, self.i2:] -= self.err1 @ self.hinv[self.i1:self.i2, self.i2:]


class _GroupGrids:
    """Group grid policy: which grid (scale, zero) each column is quantized on, and the grids to store.

    ``scales`` (float32) and ``zeros`` ``[rows, G]`` hold every group's grid once all columns are done;
    ``grid(j, block)`` gives the grid (scale, zero) of column ``j`` (processing order) when its turn comes in
    ``block``, and ``column_grid`` the quantizer of that column; ``groups()`` the group of each column in
    processing order."""

    def __init__(self, rows: int, cols: int, g: int, device, fit: _GridFit | None):
        self.cols, self.g, self.device, self.fit = cols, g, device, fit
        n_groups = (cols + g - 1) // g
        self.scales = torch.zeros(rows, n_groups, device=device)
        self.zeros = torch.zeros(rows, n_groups, device=device)

    def grid(self, j: int, block: _Block) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def column_grid(self, j: int, block: _Block):
        """Column -> ``(codes, values)`` on column ``j``'s grid: ``scale * (q - zero)``, ``q`` in ``[0, maxq]``."""
        scale, zero = self.grid(j, block)
        maxq = 2**self.fit.bits - 1

        def quantize(col):
            q = quantize_codes(col, scale, zero, maxq)
            return q, dequantize(q, scale, zero)
        return quantize

    def groups(self) -> torch.Tensor:
        raise NotImplementedError


class _OriginalGroups(_GroupGrids):
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


class _StaticGroupGrids(_OriginalGroups):
    """``static_groups``: groups of the original columns, each grid fitted up front on the weight before any
    update."""

    def __init__(self, w: torch.Tensor, g: int, perm: torch.Tensor | None, fit: _GridFit,
                 importance: torch.Tensor | None = None):
        rows, cols = w.shape
        super().__init__(rows, cols, g, w.device, fit)
        for k, (a, b) in enumerate(group_bounds(cols, g)):
            grid = fit(w[:, a:b], None if importance is None else importance[a:b])
            self.scales[:, k], self.zeros[:, k] = grid.scale, grid.zero
        self._set_order(perm)

    def grid(self, j: int, block: _Block) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.group_of(j)
        return self.scales[:, k], self.zeros[:, k]


class _FittedGroupGrids(_GroupGrids):
    """Default groups: consecutive columns in processing order; a group's grid is fitted when its first column
    comes up, on the weights as updated so far, including the columns of the group that spill past the end of
    the current block (``_Block.updated_columns``). The last group may be partial."""

    def __init__(self, rows: int, cols: int, g: int, device, fit: _GridFit, importance: torch.Tensor | None = None):
        super().__init__(rows, cols, g, device, fit)
        self.scale = self.zero = None
        self.importance = importance

    def grid(self, j: int, block: _Block) -> tuple[torch.Tensor, torch.Tensor]:
        if j % self.g == 0:
            end = min(j + self.g, self.cols)
            grid = self.fit(block.updated_columns(j, end), None if self.importance is None else self.importance[j:end])
            self.scale, self.zero = grid.scale, grid.zero
            self.scales[:, j // self.g], self.zeros[:, j // self.g] = self.scale, self.zero
        return self.scale, self.zero

    def groups(self) -> torch.Tensor:
        return torch.arange(self.cols, device=self.device) // self.g


class _BlockTypeGrids(_OriginalGroups):
    """A GGUF block type's grids (``hfquant.core.gguf_grids``): groups of the type's group size, whose stored
    parameters are fitted one span (a block, or a k-quant super-block) at a time: all up front on the original
    weight with ``static`` (act-order columns are quantized on their original group's grid), else when the span's
    first column comes up, on the weights as updated so far. ``params()`` gives the stored parameters."""

    def __init__(self, w: torch.Tensor, name: str, perm: torch.Tensor | None, static: bool):
        self.bt = block_type(name)
        rows, cols = w.shape
        if cols % self.bt.block_values:
            raise ValueError(f"GGUF {name}: {cols} input columns; expected a multiple of {self.bt.block_values}")
        super().__init__(rows, cols, self.bt.group_size, w.device, None)
        self.name, self.span = name, self.bt.block_values
        self.offsets = torch.zeros_like(self.scales)
        self.spans: list[BlockGrid | None] = [None] * (cols // self.span)
        self._set_order(perm)
        self.static = static
        if static:
            for k in range(len(self.spans)):
                self._record(k, fit_block_grid(name, w[:, k * self.span:(k + 1) * self.span]))

    def _record(self, k: int, grid: BlockGrid) -> None:
        self.spans[k] = grid
        a, b = k * self.span // self.g, (k + 1) * self.span // self.g
        self.scales[:, a:b], self.offsets[:, a:b] = grid.scale, grid.offset
        self.zeros[:, a:b] = grid.zero

    def column_grid(self, j: int, block: _Block):
        if not self.static and j % self.span == 0:
            self._record(j // self.span, fit_block_grid(self.name, block.updated_columns(j, j + self.span)))
        k = self.group_of(j)
        scale, offset = self.scales[:, k], self.offsets[:, k]
        zero, lo, hi = code_layout(self.name)

        def quantize(col):
            q = grid_codes(col, scale, zero, offset, lo, hi)
            return q, grid_values(q, scale, zero, offset)
        return quantize

    def params(self) -> dict[str, torch.Tensor]:
        return concat_params(self.spans)


def _quantize_columns(w: torch.Tensor, hinv: torch.Tensor, grids: _GroupGrids, block_size: int):
    """The column loop: every column of ``w`` (processing order, updated in place) in blocks of ``block_size``,
    each on the grid ``grids`` gives it. Returns ``(codes [rows, cols] as float, row_losses [rows], pre)``, ``pre``
    the columns' values just before they were rounded (processing order)."""
    rows, cols = w.shape
    codes = torch.zeros(rows, cols, device=w.device)
    pre = torch.zeros(rows, cols, device=w.device)
    losses = torch.zeros(rows, device=w.device)
    for i1 in range(0, cols, block_size):
        block = _Block(w, hinv, i1, min(i1 + block_size, cols))
        for j in range(block.i1, block.i2):
            grid = grids.column_grid(j, block)
            pre[:, j] = block.w1[:, j - block.i1]
            q, loss = block.quantize_column(j, grid)
            codes[:, j] = q
            losses += loss
        block.lazy_update()
    return codes, losses, pre


def _restore_column_order(codes: torch.Tensor, groups: torch.Tensor, perm: torch.Tensor | None):
    """Codes ``[rows, cols]`` and column groups ``[cols]`` from processing order back to the original column order
    (the inverse act-order permutation; nothing to do without one)."""
    if perm is None:
        return codes, groups
    invperm = torch.argsort(perm)
    return codes[:, invperm], groups[invperm]
