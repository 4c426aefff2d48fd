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


def test_mse_observer_not_worse_than_minmax_in_its_own_norm():
    w = torch.randn(32, 64) * torch.rand(32, 1)
    for sym in (True, False):
        res = {}
        for obs in ("minmax", "mse"):
            g = fit_grid(w, 3, sym, obs)
            q = quantize_codes(w, g.scale[:, None], g.zero[:, None], g.maxq)
            res[obs] = ((dequantize(q, g.scale[:, None], g.zero[:, None]) - w).abs() ** 2.4).sum(1)
        assert (res["mse"] <= res["minmax"] + 1e-6).all()
