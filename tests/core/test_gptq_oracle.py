"""GPTQ against a slow, plain oracle of the paper's algorithm, written here column by column.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323), Algorithm 1, with the options of the reference code: group-wise grids,
act-order (columns by decreasing ``diag(H)``), static groups, dead inputs and dampening. The oracle has no
blocks and no lazy updates: after each column it updates every remaining column at once,
``W[:, j+1:] -= err * Hinv[j, j+1:]``, in float64. It follows the semantics ``hfquant.core.gptq`` documents
where they differ from the reference code: a group's grid is fitted on the weights as updated so far (wherever
the group starts relative to the blocks), partial last groups are allowed, the Cholesky factors are float64.
The grid itself (``fit_grid`` / ``quantize_codes`` / ``dequantize``) is tested in test_rtn.py and used as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import gptq_kw as gptq_quantize

import hfquant.core.int_grid as gptq_module
from hfquant.core.grids import dequantize, fit_grid, quantize_codes


@dataclass
class Oracle:
    codes: torch.Tensor       # [rows, cols] in the original column order
    scales: torch.Tensor      # [rows, G]
    zeros: torch.Tensor       # [rows, G]
    g_idx: torch.Tensor       # [cols]
    row_losses: torch.Tensor  # [rows]
    dequantized: torch.Tensor  # [rows, cols] in the original column order
    ties: int = 0              # exact rounding ties resolved as ``ties_like`` did


TIE = 1e-4  # in grid steps: closer than this to a rounding boundary, float32 vs float64 may round either way


def oracle_gptq(weight, hessian, *, bits, group_size, sym, act_order=False, static_groups=False,
                damp_percent=0.01, observer="minmax", ties_like=None, fit_on_original=False) -> Oracle:
    """The oracle's codes, grids, losses and dequantized weight.

    ``ties_like``: codes (original column order) to follow where a value is within ``TIE`` grid steps of a
    rounding boundary, where both roundings are equally good and float rounding decides. Such ties are not rare:
    a symmetric grid whose range is set by a negative weight puts that weight exactly half-way between two codes
    (-7.5 steps at 4 bits), so when a group's first column holds its most negative weight, the code is a coin
    toss between the solver's float32 and this float64, and the rest of that row then follows a different path.
    Following the solver at ties (only there) keeps both on one path; any other different code is a bug.
    ``fit_on_original``: a deliberately wrong variant (grids fitted on the weights before any update).
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    g = cols if group_size == -1 else group_size
    n_groups = -(-cols // g)
    maxq = 2**bits - 1

    # dead inputs: never seen, so their weights are irrelevant: zero them, keep H invertible
    dead = torch.diagonal(h) == 0
    for i in range(cols):
        if dead[i]:
            h[i, i] = 1.0
            w[:, i] = 0.0

    # static groups: one grid per group of the original column order, on the weights before any update
    static = None
    if static_groups:
        static = [fit_grid(w[:, a:min(a + g, cols)].float(), bits, sym, observer) for a in range(0, cols, g)]

    # act-order: process columns by decreasing diag(H); order[j] is the original column at position j
    order = list(range(cols))
    if act_order:
        order = sorted(range(cols), key=lambda i: -float(h[i, i]))  # the tests have no equal diagonal entries
    w = w[:, order]
    h = h[order][:, order]
    original = w.clone()

    # dampening, then the upper Cholesky factor U of H^-1 (H^-1 = U^T U)
    h = h + damp_percent * float(torch.diagonal(h).mean()) * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).t()

    codes = torch.zeros(rows, cols, dtype=torch.float64)
    deq = torch.zeros(rows, cols, dtype=torch.float64)
    scales = torch.zeros(rows, n_groups, dtype=torch.float64)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float64)
    losses = torch.zeros(rows, dtype=torch.float64)
    g_idx = torch.zeros(cols, dtype=torch.long)
    scale = zero = None
    ties = 0
    for j in range(cols):
        col_orig = order[j]
        if static is not None:
            k = col_orig // g  # the group of the original column
            scale, zero = static[k].scale.double(), static[k].zero.double()
            scales[:, k], zeros[:, k] = scale, zero
        else:
            k = j // g  # groups are runs of g consecutive processed columns
            if j % g == 0:  # a group starts: fit its grid on its columns as updated so far
                source = original if fit_on_original else w
                grid = fit_grid(source[:, j:min(j + g, cols)].float(), bits, sym, observer)
                scale, zero = grid.scale.double(), grid.zero.double()
                scales[:, k], zeros[:, k] = scale, zero
        g_idx[col_orig] = k
        x = w[:, j]
        q = quantize_codes(x, scale, zero, maxq)
        if ties_like is not None:
            steps = x / scale
            tie = (steps - torch.floor(steps) - 0.5).abs() < TIE
            lower = torch.clamp(torch.floor(steps) + zero, 0, maxq)
            upper = torch.clamp(torch.ceil(steps) + zero, 0, maxq)
            theirs = ties_like[:, col_orig].double()
            follow = tie & ((theirs == lower) | (theirs == upper)) & (theirs != q)
            q = torch.where(follow, theirs, q)
            ties += int(follow.sum())
        xq = dequantize(q, scale, zero)
        codes[:, col_orig] = q
        deq[:, col_orig] = xq
        losses += (x - xq) ** 2 / u[j, j] ** 2 / 2
        err = (x - xq) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]  # every remaining column, right away
    return Oracle(codes, scales, zeros, g_idx, losses, deq, ties)


def inputs(n, cols, seed):
    """Correlated inputs with a few outlier channels and one dead (never active) channel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols // 3, generator=gen) @ torch.randn(cols // 3, cols, generator=gen)
    x += 0.2 * torch.randn(n, cols, generator=gen)
    x[:, [1, cols // 2]] *= 15
    x[:, 5] = 0
    return x


def problem(rows, cols, seed):
    x = inputs(256, cols, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.randn(rows, cols, generator=gen), 2 / x.shape[0] * x.t() @ x


def half_quadratic_error(w, dequantized, h, damp_percent=0.01):
    """Per row ``1/2 (w - q) H (w - q)^T`` for the dampened Hessian (dead inputs: ``H_ii = 1``, ``w_i = 0``), in
    float64. GPTQ's loss is exactly this: each step is an exact OBS update of the remaining weights, so the
    per-column losses ``(w - q)^2 / Hinv_jj^2 / 2`` add up to the quadratic error of the final weight."""
    h = h.double().clone()
    w = w.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp_percent * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    e = w - dequantized.double()
    return 0.5 * ((e @ h) * e).sum(dim=1)


def compare(ours, ref: Oracle, *, bits):
    """Raise AssertionError where the solver and the oracle disagree beyond float rounding."""
    n = ours.codes.numel()
    agree = (ours.codes.double() == ref.codes).double().mean().item()
    assert agree >= 0.995, f"codes agree on {agree:.4f} of entries"
    assert ref.ties <= 0.01 * n, f"{ref.ties} ties followed: too many to be ties"
    assert torch.equal(ours.g_idx.long(), ref.g_idx)
    zeros_agree = (ours.zeros.double() == ref.zeros).double().mean().item()
    assert zeros_agree >= 0.995, f"zeros agree on {zeros_agree:.4f}"
    scale_close = torch.isclose(ours.scales.double(), ref.scales, rtol=1e-5, atol=0).double().mean().item()
    assert scale_close >= 0.995, f"scales agree on {scale_close:.4f}"
    deq_close = torch.isclose(ours.dequantized().double(), ref.dequantized, rtol=0, atol=1e-5).double().mean().item()
    assert deq_close >= 0.995, f"dequantized weights agree on {deq_close:.4f}"
    assert ours.codes.min() >= 0 and ours.codes.max() <= 2**bits - 1
    assert ours.loss == pytest.approx(float(ref.row_losses.sum()), rel=1e-4)
    rows_close = torch.isclose(ours.row_losses.double(), ref.row_losses, rtol=1e-4).double().mean().item()
    assert rows_close >= 0.9, f"row losses agree on {rows_close:.3f} of rows"


def solve_and_compare(w, h, *, block_size, **kw):
    ours = gptq_quantize(w, h, block_size=block_size, damp_percent=0.01, **kw)
    ref = oracle_gptq(w, h, damp_percent=0.01, ties_like=ours.codes, **kw)
    compare(ours, ref, bits=kw["bits"])
    return ours, ref


CASES = {
    # name: (rows, cols, bits, group_size, sym, act_order, static_groups, block_size, observer)
    "g16-sym-w4-block24": (16, 64, 4, 16, True, False, False, 24, "minmax"),
    "g32-partial-last-asym-w3-block20": (12, 72, 3, 32, False, False, False, 20, "minmax"),
    "per-channel-asym-w4-block7": (8, 48, 4, -1, False, False, False, 7, "minmax"),
    "actorder-g16-sym-w4-block28": (24, 80, 4, 16, True, True, False, 28, "minmax"),
    "actorder-g32-partial-asym-w3-block20": (10, 72, 3, 32, False, True, False, 20, "minmax"),
    "actorder-static-g32-partial-asym-w3-block20": (12, 72, 3, 32, False, True, True, 20, "minmax"),
    "actorder-static-g16-sym-w4-block24": (16, 96, 4, 16, True, True, True, 24, "minmax"),
    "actorder-g24-sym-w3-block40-mse": (8, 96, 3, 24, True, True, False, 40, "mse"),
    "g20-asym-w4-block32-mse": (8, 60, 4, 20, False, False, False, 32, "mse"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_matches_the_plain_oracle(case):
    rows, cols, bits, gs, sym, act, static, block, observer = CASES[case]
    w, h = problem(rows, cols, sorted(CASES).index(case))
    ours, ref = solve_and_compare(w, h, block_size=block, bits=bits, group_size=gs, sym=sym, act_order=act,
                                  static_groups=static, observer=observer)
    assert ours.damp == 0.01 and ours.retries == 0
    # the oracle's bookkeeping is exact (a check of the oracle itself), the solver's up to float32
    torch.testing.assert_close(ref.row_losses, half_quadratic_error(w, ref.dequantized, h), rtol=1e-9, atol=0)
    torch.testing.assert_close(ours.row_losses.double(), half_quadratic_error(w, ours.dequantized(), h),
                               rtol=1e-4, atol=0)
    assert torch.equal(ours.dequantized()[:, 5], torch.zeros(rows))  # the dead input
    if act and not static:  # groups follow the processing order: g_idx is not monotone
        assert (ours.g_idx.diff() < 0).any()
    else:
        assert (ours.g_idx.diff() >= 0).all()


def test_block_size_does_not_change_the_result():
    """The lazy block updates are an implementation detail: every block size gives the oracle's answer."""
    w, h = problem(12, 72, 11)
    for block in (1, 5, 20, 32, 72, 128):
        solve_and_compare(w, h, block_size=block, bits=3, group_size=32, sym=False, act_order=True)


def test_the_comparison_catches_grids_fitted_on_the_original_weights(monkeypatch):
    """Grids fitted on the weights before the error updates (the first documented difference from the reference
    code, in its extreme form) must fail the comparison, whether the bug is in the oracle or in the solver."""
    w, h = problem(16, 64, 3)
    kw = dict(bits=3, group_size=16, sym=False, act_order=True)
    ours, _ = solve_and_compare(w, h, block_size=24, **kw)  # the real solver passes

    # 1. the oracle with the bug
    with pytest.raises(AssertionError):
        compare(ours, oracle_gptq(w, h, ties_like=ours.codes, fit_on_original=True, **kw), bits=3)

    # 2. the solver with the bug: its k-th grid (group k in processing order) fitted on the original weights
    order = sorted(range(64), key=lambda i: -float(h[i, i]))
    original = w[:, order].clone()
    original[:, order.index(5)] = 0  # the dead input, zeroed as the solver does
    real_fit, calls = gptq_module.fit_grid, []

    def fit_on_original(part, bits, sym, observer="minmax", **extra):
        k = len(calls)
        calls.append(k)
        return real_fit(original[:, k * 16:(k + 1) * 16], bits, sym, observer, **extra)

    monkeypatch.setattr(gptq_module, "fit_grid", fit_on_original)
    with pytest.raises(AssertionError):
        solve_and_compare(w, h, block_size=24, **kw)
    assert len(calls) == 4
