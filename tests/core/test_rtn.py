import pytest
import torch

from hfquant.core.grids import dequantize, fit_grid, group_bounds, quantize_codes, rtn_quantize


def test_zero_is_representable_and_sym_zero_point():
    w = torch.randn(16, 40)
    for sym in (True, False):
        g = fit_grid(w, 4, sym)
        q = quantize_codes(torch.zeros(16, 1), g.scale[:, None], g.zero[:, None], g.maxq)
        assert torch.allclose(dequantize(q, g.scale[:, None], g.zero[:, None]), torch.zeros(16, 1))
    assert (fit_grid(w, 4, True).zero == 8).all()


def test_all_zero_row_gets_unit_range():
    g = fit_grid(torch.zeros(2, 8), 4, False)
    assert torch.allclose(g.scale, torch.full((2,), 2 / 15))


def test_partial_last_group():
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    codes, scales, zeros, g_idx = rtn_quantize(torch.randn(8, 576), 4, 128, True)
    assert scales.shape == (8, 5) and zeros.shape == (8, 5)
    assert g_idx[-1] == 4 and (g_idx[512:] == 4).all()
    assert codes.min() >= 0 and codes.max() <= 15


def test_rtn_error_shrinks_with_bits_and_groups():
    w = torch.randn(64, 256)

    def err(bits, gs):
        codes, scales, zeros, g_idx = rtn_quantize(w, bits, gs, False)
        g = g_idx.long()
        return float(((scales[:, g] * (codes - zeros[:, g]) - w) ** 2).sum())

    assert err(8, 128) < err(4, 128) < err(3, 128) < err(2, 128)
    assert err(4, 32) < err(4, 128) < err(4, -1)


def _brute_force_mse_grid(row, bits, sym):
    """The mse observer written out for one row, in float64: every shrink ``p = 1 - i/100`` (``i < 80``) of the
    minmax range, the error ``sum |w - w_hat| ** 2.4`` of each, and the first candidate with the least error."""
    maxq = 2**bits - 1
    lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
    if sym:
        hi = max(-lo, hi)
        lo = -hi if lo < 0 else lo
    best = None
    for i in range(80):
        p = 1 - i / 100
        scale = (p * hi - p * lo) / maxq
        zero = (maxq + 1) / 2 if sym else round(-p * lo / scale)
        q = torch.clamp(torch.round(row.double() / scale) + zero, 0, maxq)
        err = float((scale * (q - zero) - row.double()).abs().pow(2.4).sum())
        if best is None or err < best[0]:
            best = (err, scale, zero, p)
    return best


def _errors(w, g, norm):
    q = quantize_codes(w, g.scale[:, None], g.zero[:, None], g.maxq)
    return (dequantize(q, g.scale[:, None], g.zero[:, None]) - w).abs().double().pow(norm).sum(1)


def test_mse_observer_is_the_argmin_of_a_brute_force_search():
    """Every row's mse grid is the brute-force search's argmin over the same 80 shrinks (scale, zero and error),
    and that search really moves off the minmax grid (the first candidate) on most rows."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=gen) * torch.rand(24, 1, generator=gen)
    w[:4, 7] *= 6  # a few rows with an outlier
    for bits, sym in [(2, True), (2, False), (3, True), (3, False), (4, True), (4, False)]:
        g = fit_grid(w, bits, sym, "mse")
        got_err = _errors(w, g, 2.4)
        shrunk = 0
        for r in range(w.shape[0]):
            err, scale, zero, p = _brute_force_mse_grid(w[r], bits, sym)
            assert float(g.scale[r]) == pytest.approx(scale, rel=1e-6), (bits, sym, r)
            assert float(g.zero[r]) == zero, (bits, sym, r)
            assert float(got_err[r]) == pytest.approx(err, rel=1e-5), (bits, sym, r)
            shrunk += p < 1
        assert shrunk >= w.shape[0] // 2, (bits, sym, shrunk)


def test_mse_observer_clips_wide_rows_strictly_better_than_minmax():
    """256 Gaussian weights per row at 3 bits: the minmax range (about +-3 sigma) wastes levels on the tails;
    clipping wins clearly on every row, in the observer's norm and in plain squared error."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=gen)
    for sym in (True, False):
        minmax, mse = fit_grid(w, 3, sym, "minmax"), fit_grid(w, 3, sym, "mse")
        assert (mse.scale < minmax.scale).all()
        for norm in (2.4, 2.0):
            a, b = _errors(w, minmax, norm), _errors(w, mse, norm)
            assert (b < 0.9 * a).all(), (sym, norm, float((b / a).max()))
            assert b.sum() < 0.75 * a.sum(), (sym, norm, float(b.sum() / a.sum()))
