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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    row_losses: torch.Tensor
    damp: float
    retries: int

    @property
    def loss(self) -> float:
        return float(self.row_losses.sum())

    def dequantized(self) -> torch.Tensor:
        """The fake-quantized weight ``scale[g_idx] * (codes - zero[g_idx])`` in float32."""
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
                      block_size=block_size, observer=observer, scale_dtype=scale_dtype)


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
) -> GPTQResult:
    """Step 5 above for ``weight`` ``[rows, cols]`` on a prepared Hessian factor.

    ``scale_dtype``: the dtype the scales are stored in (the model's, e.g. bfloat16). Each group's scale is
    rounded to it before its codes are chosen, so the codes, the losses and ``dequantized()`` are those of
    the stored grid. Every tensor is created on ``weight``'s device.
    """
    w = weight.float().clone()
    rows, cols = w.shape
    device = w.device
    g = cols if group_size == -1 else group_size
    maxq = 2**bits - 1
    perm, hinv = factor.perm, factor.hinv.to(device)
    w[:, factor.dead.to(device)] = 0

    static = None
    if static_groups:
        static = [fit_grid(w[:, a:b], bits, sym, observer, scale_dtype=scale_dtype) for a, b in group_bounds(cols, g)]
    if perm is not None:
        perm = perm.to(device)
        w = w[:, perm]

    n_groups = (cols + g - 1) // g
    codes = torch.zeros(rows, cols, device=device)
    scales = torch.zeros(rows, n_groups, device=device)
    zeros = torch.zeros(rows, n_groups, device=device)
    losses = torch.zeros(rows, device=device)
    if static is not None:
        for k, grid in enumerate(static):
            scales[:, k], zeros[:, k] = grid.scale, grid.zero
    orig_col = perm.tolist() if perm is not None else list(range(cols))

    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                k = orig_col[j] // g
                scale, zero = scales[:, k], zeros[:, k]
            elif j % g == 0:
                end = min(j + g, cols)
                part = w1[:, i : end - i1]
                if end > i2:
                    # Columns past this block still owe the lazy update from columns i1..j-1.
                    rest = w[:, i2:end] - err1[:, :i] @ hinv[i1:j, i2:end]
                    part = torch.cat([part, rest], dim=1)
                grid = fit_grid(part, bits, sym, observer, scale_dtype=scale_dtype)
                scale, zero = grid.scale, grid.zero
                scales[:, j // g], zeros[:, j // g] = scale, zero
            col = w1[:, i]
            d = hinv1[i, i]
            q = quantize_codes(col, scale, zero, maxq)
            dq = dequantize(q, scale, zero)
            codes[:, j] = q
            losses += (col - dq).pow(2) / d**2 / 2
            err = (col - dq) / d
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    arange = torch.arange(cols, device=device)
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        g_idx = arange // g if static is not None else (arange // g)[invperm]
    else:
        g_idx = arange // g
    return GPTQResult(
        codes=codes.int(),
        scales=scales,
        zeros=zeros.int(),
        g_idx=g_idx.int(),
        row_losses=losses,
        damp=factor.damp,
        retries=factor.retries,
    )
