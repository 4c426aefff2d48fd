import math

import pytest
import torch

from helpers import gptq_kw as gptq_quantize

from hfquant.core.gptq import inverse_hessian_factor
from hfquant.core.grids import fit_grid, rtn_quantize


def correlated_inputs(n, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols // 4, generator=gen)
    mix = torch.randn(cols // 4, cols, generator=gen)
    x = base @ mix + 0.1 * torch.randn(n, cols, generator=gen)
    x[:, :3] *= 20  # a few outlier channels, as in real activations
    return x


def hessian(x):
    return 2 / x.shape[0] * x.t() @ x


def reference_gptq(w, h, bits, sym, damp=0.01):
    """Direct port of the reference fasterquant (no groups, no blocks, no act-order), for comparison."""
    w = w.clone().double()
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    grid = fit_grid(w.float(), bits, sym)
    scale, zero = grid.scale.double(), grid.zero.double()
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        col = w[:, i]
        qi = torch.clamp(torch.round(col / scale) + zero, 0, 2**bits - 1)
        deq = scale * (qi - zero)
        q[:, i] = qi
        err = (col - deq) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    return q


def weighted_error(w, deq, h):
    d = (w - deq).double()
    return float(torch.einsum("ri,ij,rj->", d, h.double(), d))


@pytest.mark.parametrize("block_size", [7, 32, 128])
def test_matches_reference_per_channel(block_size):
    x = correlated_inputs(512, 48)
    w = torch.randn(12, 48)
    ours = gptq_quantize(w, hessian(x), bits=4, group_size=-1, sym=False, block_size=block_size)
    ref = reference_gptq(w, hessian(x), 4, False)
    agree = (ours.codes.double() == ref).double().mean()
    assert agree > 0.99  # float32 blocks vs float64 columns: rare ties may round differently


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 20, 64])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("order", ["none", "act", "act+static"])
def test_gptq_error_not_worse_than_rtn(bits, group_size, sym, order):
    cols = 72  # group 16 and 20 leave partial groups, 64 leaves a partial second group
    x = correlated_inputs(1024, cols, seed=bits)
    h = hessian(x)
    w = torch.randn(24, cols)
    res = gptq_quantize(w, h, bits=bits, group_size=group_size, sym=sym, act_order=order != "none",
                        static_groups=order == "act+static", block_size=32)
    codes, scales, zeros, g_idx = rtn_quantize(w, bits, group_size, sym)
    g = g_idx.long()
    rtn = scales[:, g] * (codes - zeros[:, g])
    assert weighted_error(w, res.dequantized(), h) <= weighted_error(w, rtn, h) * 1.0001
    assert res.codes.min() >= 0 and res.codes.max() <= 2**bits - 1
    n_groups = 1 if group_size == -1 else math.ceil(cols / group_size)
    assert res.scales.shape == (24, n_groups) and res.g_idx.shape == (cols,)
    counts = torch.bincount(res.g_idx.long(), minlength=n_groups)
    assert int(counts.sum()) == cols and (counts <= (cols if group_size == -1 else group_size)).all()
    if order == "act+static" or order == "none":
        assert (res.g_idx.diff() >= 0).all()  # monotone


def test_fused_rows_equal_separate_solves():
    x = correlated_inputs(256, 32)
    h = hessian(x)
    a, b = torch.randn(8, 32), torch.randn(5, 32)
    kw = dict(bits=4, group_size=16, sym=True, act_order=True, block_size=8)
    fused = gptq_quantize(torch.cat([a, b]), h, **kw)
    sep = [gptq_quantize(a, h, **kw), gptq_quantize(b, h, **kw)]
    assert torch.equal(fused.codes, torch.cat([s.codes for s in sep]))
    assert torch.equal(fused.scales, torch.cat([s.scales for s in sep]))


def test_dead_inputs_are_zeroed():
    x = correlated_inputs(256, 32)
    x[:, 5] = 0
    res = gptq_quantize(torch.randn(4, 32), hessian(x), bits=4, group_size=-1, sym=False)
    assert torch.allclose(res.dequantized()[:, 5], torch.zeros(4), atol=1e-6)


def test_damping_is_raised_when_hessian_is_singular():
    x = correlated_inputs(8, 32)  # rank 8 < 32: singular without damping
    upper, damp, retries = inverse_hessian_factor(hessian(x), 0.0)
    assert upper is not None and retries >= 1 and damp > 0
    res = gptq_quantize(torch.randn(4, 32), hessian(x), bits=4, group_size=-1, sym=True, damp_percent=0.0)
    assert res is not None and res.retries >= 1


def test_indefinite_hessian_returns_none():
    h = -torch.eye(16)
    assert gptq_quantize(torch.randn(3, 16), h, bits=4, group_size=-1, sym=True) is None
