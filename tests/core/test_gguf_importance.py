"""Calibrated GGUF grids (llama.cpp's importance-matrix idea on GPTQ's Hessian): Q4_0 / Q5_0 scales searched for
the importance-weighted error, never worse on that error than the uncalibrated signed-max scale."""

import pytest
import torch

from hfquant.core.gguf_grids import code_layout, fit_block_grid, grid_codes, grid_values


def _block_errors(name, w, importance, grid):
    """Importance-weighted squared error of each 32-block ``[rows, blocks]`` on ``grid``, nearest codes."""
    zero, lo, hi = code_layout(name)
    s = grid.scale.repeat_interleave(32, dim=1)
    o = grid.offset.repeat_interleave(32, dim=1)
    q = grid_codes(w, s, zero, o, lo, hi)
    return (importance * (grid_values(q, s, zero, o) - w) ** 2).view(w.shape[0], -1, 32).sum(-1)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0"])
def test_importance_weighted_scales_lower_the_weighted_error(name):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(1, 256, generator=g)
    importance = torch.rand(256, generator=g) ** 4 * 10  # a few columns matter much more than the rest
    plain, weighted = fit_block_grid(name, w), fit_block_grid(name, w, importance)
    e_plain, e_weighted = _block_errors(name, w, importance, plain), _block_errors(name, w, importance, weighted)
    assert float(e_weighted.sum()) < 0.9 * float(e_plain.sum())
    # on the weights the search uses (llama.cpp's: importance x sqrt(row mean of w^2 + w^2)) no block is worse than
    # the signed-max scale, one of its candidates, beyond the float16 rounding of d
    searched = importance * (w.pow(2).mean(1, keepdim=True) + w.pow(2)).sqrt()
    assert bool((_block_errors(name, w, searched, weighted) <= _block_errors(name, w, searched, plain) * 1.01).all())
    assert weighted.params["d"].dtype == torch.float16


def test_zero_blocks_keep_a_zero_scale():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    grid = fit_block_grid("Q4_0", w, torch.ones(64))
    assert float(grid.scale[1:].abs().max()) == 0.0 and float(grid.scale[0, 0]) != 0.0
    assert bool(torch.isfinite(grid.scale).all())
