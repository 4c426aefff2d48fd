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
it); ``gptq_solve`` does step 5 for one weight, in parts: the weight format's group grid policy
(``WeightFormat.solver_grids``: for ``IntGrid`` every grid fitted up front on the original columns, or each fitted
when its group starts; for ``GGUFBlocks`` the block type's grids), the lazy-update block (``_Block``: one column's quantization and in-block update, the columns a group spills
past the block's end, the lazy update of later blocks), the column loop over the blocks
(``_quantize_columns``), and the return to the original column order (``_restore_column_order``).
``gptq_quantize`` is both in one call.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace

import torch

from hfquant.core.weight_format import WeightFormat


@dataclass(frozen=True)
class SolveArgs:
    """The GPTQ settings a solve reads. The config's ``GPTQArgs`` section (``hfquant.config``) has the same names
    and is passed as is; this default serves direct calls."""

    desc_act: bool = False  # act-order (``prepare_hessian``)
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    gptaq_alpha: float = 0.25  # strength of the asymmetric-calibration correction, when a ``cross`` term is given


@dataclass
class GPTQResult:
    """Outcome of one GPTQ solve.

    Attributes:
        format: the weight format the solve quantized onto (``hfquant.core.weight_format``).
        stored: the format's stored tensors (named by ``format.fields``; for ``IntGrid``: int32 codes ``[rows,
            cols]`` in the original column order, float32 scales and int32 zeros ``[rows, G]``, int32 ``g_idx``
            ``[cols]``, not monotone for act-order without static groups). ``result["codes"]`` reads one by name.
        cols: the weight's input columns.
        row_losses: float32 ``[rows]``, ``sum_i (w - q)^2 / Hinv_ii^2 / 2`` per row (the reference's error).
        damp: damping fraction finally used.
        retries: how many times the damping was raised.
        pre: float32 ``[rows, cols]`` (original column order): each weight as GPTQ's updates left it just before it
            was rounded, so ``codes == clamp(round(pre / scale) + zero)``; block reconstruction starts from it.
    """

    format: WeightFormat
    stored: tuple[torch.Tensor, ...]
    cols: int
    row_losses: torch.Tensor
    damp: float
    retries: int
    pre: torch.Tensor | None = None

    def __getitem__(self, field: str) -> torch.Tensor:
        return self.stored[self.format.fields.index(field)]

    @property
    def loss(self) -> float:
        return float(self.row_losses.sum())

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the stored tensors hold (``format.dequantize``)."""
        return self.format.dequantize(self.stored, self.cols)


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
        diag: float32 diagonal of the dampened ``H`` (act-order column order): each input's mean square, the
            statistic of llama.cpp's importance matrix.
    """

    hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float
    retries: int
    diag: torch.Tensor | None = None


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
    diag = torch.diagonal(h)
    return HessianFactor(hinv, perm, dead, damp, retries, diag + damp * diag.mean())


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, args=SolveArgs(), *,
                  scale_dtype: torch.dtype | None = None) -> GPTQResult | None:
    """Quantize ``weight`` (``[rows, cols]``) onto ``fmt`` given the input Hessian ``hessian`` (``[cols, cols]``).

    Rows are independent given ``H``, so weights of several Linears that read the same input
    (q/k/v, gate/up) can be concatenated along rows and solved at once, or solved one after another on
    one ``prepare_hessian`` factor (``gptq_solve``), with the same result up to float rounding.

    Returns ``None`` when no damping up to the maximum makes ``H`` positive definite.
    """
    factor = prepare_hessian(hessian, act_order=args.desc_act, damp_percent=args.damp_percent)
    if factor is None:
        return None
    return gptq_solve(weight, factor, fmt, args, scale_dtype=scale_dtype)


def gptq_solve(weight: torch.Tensor, factor: HessianFactor, fmt: WeightFormat, args=SolveArgs(), *,
               scale_dtype: torch.dtype | None = None, cross: torch.Tensor | None = None) -> GPTQResult:
    """Step 5 above for ``weight`` ``[rows, cols]`` on a prepared Hessian factor, onto the weight format ``fmt``
    (its ``solver_grids`` fit the grids and pick each column's codes), with ``args``'s ``static_groups`` and
    ``block_size`` (a ``SolveArgs`` or the config's ``GPTQArgs``).

    ``cross``: GPTAQ's asymmetric calibration (``asymmetric_target``): ``2/n sum (X_float - X)^T X`` ``[cols, cols]``
    of this input, scaled as the Hessian; the weight is first moved to ``asymmetric_target``'s target, with
    strength ``args.gptaq_alpha``, and the solve (grids included) quantizes that.

    ``scale_dtype``: the dtype the scales are stored in (the model's, e.g. bfloat16). Each group's scale is
    rounded to it before its codes are chosen, so the codes, the losses and ``dequantized()`` are those of
    the stored grid. Every tensor is created on ``weight``'s device.
    """
    w = weight.float().clone()
    device = w.device
    perm = factor.perm.to(device) if factor.perm is not None else None
    hinv = factor.hinv.to(device)
    w[:, factor.dead.to(device)] = 0
    if cross is not None:
        w = asymmetric_target(w, cross, factor, args.gptaq_alpha)
    grids = fmt.solver_grids(w, perm, args.static_groups, hinv, scale_dtype,
                             h_diag=None if factor.diag is None else factor.diag.to(device))
    if perm is not None:
        w = w[:, perm]
    codes, losses, pre = _quantize_columns(w, hinv, grids, args.block_size)
    codes, g_idx = _restore_column_order(codes, grids.groups(), perm)
    if perm is not None:
        pre = pre[:, torch.argsort(perm)]
    return GPTQResult(format=fmt, stored=grids.stored(codes, g_idx), cols=w.shape[1], row_losses=losses, damp=factor.damp,
                      retries=factor.retries, pre=pre)


def join_rows(parts: list[GPTQResult | None]) -> GPTQResult | None:
    """One weight's result from the results of its consecutive row slabs, solved on the same factor (GPTQ treats
    rows independently, so this is the whole solve's result); ``None`` if a slab has none."""
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return replace(first, stored=first.format.join_rows([p.stored for p in parts]),
                   row_losses=torch.cat([p.row_losses for p in parts]),
                   pre=torch.cat([p.pre for p in parts]) if all(p.pre is not None for p in parts) else None)


def split_rows(res: GPTQResult, sizes: list[int]) -> list[GPTQResult]:
    """The results of consecutive weights of ``sizes`` rows from one solve of their rows stacked (on one factor; GPTQ
    treats rows independently), the inverse of ``join_rows``."""
    out, r0 = [], 0
    for n in sizes:
        out.append(replace(res, stored=res.format.split_rows(res.stored, r0, r0 + n), row_losses=res.row_losses[r0:r0 + n],
                           pre=None if res.pre is None else res.pre[r0:r0 + n]))
        r0 += n
    return out


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


def _quantize_columns(w: torch.Tensor, hinv: torch.Tensor, grids, block_size: int):
    """The column loop: every column of ``w`` (processing order, updated in place) in blocks of ``block_size``,
    each on the grid ``grids`` gives it. Returns ``(codes [rows, cols] as float, row_losses [rows], pre)``, ``pre``
    the columns' values just before they were rounded (processing order)."""
    rows, cols = w.shape
    codes = torch.zeros(rows, cols, device=w.device)
    pre = torch.zeros(rows, cols, device=w.device)
    losses = torch.zeros(rows, device=w.device)
    run_segment = fused_column_loop(w)
    for i1 in range(0, cols, block_size):
        block = _Block(w, hinv, i1, min(i1 + block_size, cols))
        j = block.i1
        while run_segment is not None and j < block.i2:  # fused: a kernel per run of columns on known grids
            j2 = grids.segment_end(j, block.i2)
            run_segment(block, j, j2, grids.segment(j, j2, block), codes, pre, losses)
            j = j2
        for j in range(j, block.i2):  # PyTorch: a few small kernels per column
            grid = grids.column_grid(j, block)
            pre[:, j] = block.w1[:, j - block.i1]
            q, loss = block.quantize_column(j, grid)
            codes[:, j] = q
            losses += loss
        block.lazy_update()
    return codes, losses, pre


COLUMN_LOOP_ENV = "HFQUANT_GPTQ_LOOP"  # "auto" (default: fused on CUDA where Triton is installed), "fused", "torch"


def fused_column_loop(w: torch.Tensor):
    """``hfquant.core.gptq_triton.run_segment`` when the column loop runs fused (``HFQUANT_GPTQ_LOOP``: ``auto``, the
    default, on CUDA tensors where Triton is installed; ``fused`` always, e.g. on the CPU under ``TRITON_INTERPRET=1``;
    ``torch`` never), else ``None``."""
    mode = os.environ.get(COLUMN_LOOP_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "fused", "torch"):
        raise ValueError(f"{COLUMN_LOOP_ENV}={mode!r}; expected auto (the default), fused or torch")
    if mode == "torch" or (mode == "auto" and (w.device.type != "cuda" or importlib.util.find_spec("triton") is None)):
        return None
    # Triton: an optional dependency, loaded only for a fused solve
    from hfquant.core.gptq_triton import run_segment
    return run_segment


def _restore_column_order(codes: torch.Tensor, groups: torch.Tensor, perm: torch.Tensor | None):
    """Codes ``[rows, cols]`` and column groups ``[cols]`` from processing order back to the original column order
    (the inverse act-order permutation; nothing to do without one)."""
    if perm is None:
        return codes, groups
    invperm = torch.argsort(perm)
    return codes[:, invperm], groups[invperm]
