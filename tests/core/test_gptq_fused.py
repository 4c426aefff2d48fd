"""GPTQ's fused column loop (``hfquant.core.gptq_triton``, a Triton kernel per run of columns) against the PyTorch
loop: bit-identical stored tensors, losses and pre-rounding values under ``TRITON_INTERPRET=1`` (the CPU, CI), for
grids fitted up front and on the updated weights (groups aligned with the blocks, smaller, larger and spilling past
them, partial last groups), act-order, symmetric and asymmetric integer grids and GGUF block types (offsets, constant
zero points, k-quant super-blocks wider than a block). On a GPU the compiler may fuse the update into a multiply-add,
so there the codes are compared by agreement (``tests/test_gpu.py``)."""

import os

import pytest
import torch

pytest.importorskip("triton")

from hfquant.core.gguf_format import GGUFBlocks  # noqa: E402
from hfquant.core.gptq import fused_column_loop, gptq_quantize, SolveArgs  # noqa: E402
from hfquant.core.int_grid import IntGrid  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels on the CPU need TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(rows, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols // 4, generator=gen) @ torch.randn(cols // 4, cols, generator=gen)
    x += 0.1 * torch.randn(4 * cols, cols, generator=gen)
    x[:, :3] *= 20
    w = torch.randn(rows, cols, generator=gen) * 0.05
    w[:5, 7] = 0.8  # a few outliers
    return w.to(DEVICE), (2 / x.shape[0] * x.t() @ x).to(DEVICE)


def solve(monkeypatch, loop, w, h, fmt, args):
    monkeypatch.setenv("HFQUANT_GPTQ_LOOP", loop)
    assert (fused_column_loop(w) is not None) == (loop == "fused")
    return gptq_quantize(w, h, fmt, args)


CASES = [  # (rows, cols, format, desc_act, static_groups, block_size)
    (40, 256, IntGrid(4, 128, True), False, False, 128),      # groups = blocks
    (40, 256, IntGrid(4, 32, False), True, False, 128),       # several groups per block, act-order
    (24, 200, IntGrid(3, 48, False), False, False, 64),       # groups spilling past blocks, a partial last group
    (24, 320, IntGrid(4, 128, True, "hessian"), True, True, 128),  # static groups with act-order
    (17, 96, IntGrid(8, -1, False), False, False, 32),        # per channel, rows not a multiple of the tile
    (16, 256, GGUFBlocks("Q4_0"), False, False, 128),         # offsets none, constant zero, spans of 32
    (16, 256, GGUFBlocks("Q4_K"), False, False, 128),         # a super-block of 256 spilling past the block
    (16, 512, GGUFBlocks("Q6_K"), True, True, 128),           # static, act-order
]


@pytest.mark.parametrize("rows,cols,fmt,desc_act,static,block", CASES)
def test_fused_loop_equals_the_torch_loop(monkeypatch, rows, cols, fmt, desc_act, static, block):
    w, h = problem(rows, cols)
    args = SolveArgs(desc_act=desc_act, static_groups=static, block_size=block)
    ref = solve(monkeypatch, "torch", w, h, fmt, args)
    got = solve(monkeypatch, "fused", w, h, fmt, args)
    assert len(got.stored) == len(ref.stored)
    for a, b in zip(got.stored, ref.stored, strict=True):
        if DEVICE == "cpu":
            assert torch.equal(a, b)
        else:  # the compiled kernel may round the update once less (fused multiply-add)
            assert a.dtype != torch.int32 or float((a == b).float().mean()) >= 0.995
    if DEVICE == "cpu":
        assert torch.equal(got.row_losses, ref.row_losses) and torch.equal(got.pre, ref.pre)


def test_loop_setting_is_checked(monkeypatch):
    monkeypatch.setenv("HFQUANT_GPTQ_LOOP", "fast")
    with pytest.raises(ValueError, match=r"HFQUANT_GPTQ_LOOP='fast'; expected auto \(the default\), fused or torch"):
        fused_column_loop(torch.zeros(2, 2))
    monkeypatch.setenv("HFQUANT_GPTQ_LOOP", "auto")
    assert fused_column_loop(torch.zeros(2, 2)) is None  # the CPU's loop is PyTorch's unless asked


def test_stacked_solve_equals_separate_solves():
    """q/k/v (or gate/up) read one input: on CUDA they are solved as one stacked weight per format and split back
    (``solve_stacked``). GPTQ treats rows independently, so on the CPU (whose float32 GEMMs give a row the same bits
    whatever the row count) the split results are the separate solves, bit for bit; formats stay apart."""
    from hfquant.core.gptq import gptq_solve, prepare_hessian
    from hfquant.quantize.weight_only import solve_stacked

    w, h = problem(96, 128)
    w, h = w.cpu(), h.cpu()
    factor = prepare_hessian(h, act_order=True)
    args = SolveArgs(desc_act=True, static_groups=False, block_size=64)
    weights = [(w[:40], IntGrid(4, 32, False), torch.float32), (w[40:56], IntGrid(8, -1, True), torch.float32),
               (w[56:], IntGrid(4, 32, False), torch.float32)]
    calls = []

    def solve(x, fmt, dtype):
        calls.append((x.shape[0], fmt))
        return gptq_solve(x, factor, fmt, args, scale_dtype=dtype)
    stacked = solve_stacked(weights, solve)
    assert calls == [(80, IntGrid(4, 32, False)), (16, IntGrid(8, -1, True))]
    for (x, fmt, dtype), got in zip(weights, stacked, strict=True):
        ref = gptq_solve(x, factor, fmt, args, scale_dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(got.stored, ref.stored, strict=True))
        assert torch.equal(got.row_losses, ref.row_losses) and torch.equal(got.pre, ref.pre)
    assert solve_stacked(weights, lambda x, fmt, dtype: None) == [None, None, None]
