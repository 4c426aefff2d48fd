"""Triton kernels against the PyTorch references: under TRITON_INTERPRET=1 on CPU (CI), compiled on CUDA.

Tolerances: W4A16 dequantizes with the reference's float32 operations, so only the accumulation order
differs: 1e-5 relative for float32 activations, 2e-3 for float16 and 1e-2 for bfloat16 (the reference
rounds the dequantized weight to the activation dtype; the GEMV keeps it in float32, so their difference
is that rounding, about 3e-3 for bfloat16). W8A8: the activation codes and scales match
the reference exactly; the outputs are bit-identical under the interpreter and within 1e-6 relative
compiled (the compiler may fuse the bias add into an FMA).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from hfquant.core.grids import rtn_quantize  # noqa: E402
from hfquant.core.smoothquant import quantize_activation_int8  # noqa: E402
from hfquant.kernels import triton_kernels as tk  # noqa: E402
from hfquant.kernels.weight_only import weight_only_reference  # noqa: E402
from hfquant.kernels.w8a8 import w8a8_reference  # noqa: E402
from hfquant.nn.weight_only import QuantLinearWeightOnly  # noqa: E402
from hfquant.nn.w8a8 import QuantLinearW8A8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def w4_module(in_f, out_f, group, act_perm, bias, sym=False, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    codes, scales, zeros, g_idx = rtn_quantize(lin.weight.data, 4, group, sym=sym)
    if act_perm:  # act-order layout: groups are sets of permuted columns, g_idx is not monotone
        g = in_f if group == -1 else group
        g_idx = (torch.arange(in_f) // g)[torch.argsort(torch.randperm(in_f))].int()
    return QuantLinearWeightOnly.from_float(lin, codes, scales, zeros, g_idx, 4, group).to(DEVICE)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("in_f,out_f,group", [(96, 40, 64), (200, 64, 128), (256, 48, 32), (160, 72, -1)])
@pytest.mark.parametrize("act_perm", [False, True])
@pytest.mark.parametrize("m", [1, 3, 5, 33])
def test_weight_only_triton_matches_reference(in_f, out_f, group, act_perm, m):
    mod = w4_module(in_f, out_f, group, act_perm, bias=(m % 2 == 1))
    for dtype in DTYPES:
        x = torch.randn(m, in_f, device=DEVICE).to(dtype)
        got = tk.weight_only_triton(x, mod)
        assert got is not None and got.dtype == dtype and got.shape == (m, out_f)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert rel(got, weight_only_reference(x, mod)) < tol, (dtype, rel(got, weight_only_reference(x, mod)))


def test_weight_only_triton_3d_input_and_unsupported_layouts():
    mod = w4_module(128, 32, 64, False, bias=True)
    x = torch.randn(2, 3, 128, device=DEVICE)
    assert rel(tk.weight_only_triton(x, mod), weight_only_reference(x, mod)) < 1e-5
    lin = torch.nn.Linear(64, 16)
    codes, scales, zeros, g_idx = rtn_quantize(lin.weight.data, 3, 32, sym=True)
    three_bit = QuantLinearWeightOnly.from_float(lin, codes, scales, zeros, g_idx, 3, 32).to(DEVICE)
    assert tk.weight_only_triton(torch.randn(1, 64, device=DEVICE), three_bit) is None
    odd_group = w4_module(96, 16, 48, False, bias=False)  # groups must be a power of two >= 32 (or -1)
    assert tk.weight_only_triton(torch.randn(1, 96, device=DEVICE), odd_group) is None


def test_weight_only_gemv_is_deterministic():
    mod = w4_module(256, 64, 32, True, bias=True)
    x = torch.randn(1, 256, device=DEVICE)
    assert torch.equal(tk.weight_only_triton(x, mod), tk.weight_only_triton(x, mod))


def test_quantize_rows_matches_reference_including_ties():
    torch.manual_seed(0)
    x = torch.randn(7, 300, device=DEVICE) * 3
    # Row 0: absmax 127 gives scale exactly 1, and k + 0.5 values are exact ties (half to even).
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5])
    # just below a half: v + 0.5 rounds up to 1.0 in float32, so floor(v + 0.5) would give 1 where round gives 0
    x[0, 8:11] = torch.tensor([0.5 - 2**-25, -(0.5 - 2**-25), 2.5 - 2**-23])
    x[1] = 0.0  # all-zero row: the scale is clamped to 1e-8
    q, s = tk.quantize_rows(x, None)
    q_ref, s_ref = quantize_activation_int8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref.reshape(-1))
    static = torch.tensor([0.05], device=DEVICE)
    q, s = tk.quantize_rows(x, static)
    q_ref, _ = quantize_activation_int8(x, static)
    assert torch.equal(q, q_ref) and bool((s == 0.05).all())


@pytest.mark.parametrize("in_f,out_f,m", [(96, 40, 1), (200, 64, 17), (256, 48, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_triton_matches_reference(in_f, out_f, m, bias, static):
    torch.manual_seed(1)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    mod = QuantLinearW8A8.from_float(lin, lin.weight.data, input_scale=0.03 if static else None).to(DEVICE)
    x = torch.randn(m, in_f, device=DEVICE)
    got, ref = tk.w8a8_triton(x, mod), w8a8_reference(x, mod)
    if INTERPRETED:
        assert torch.equal(got, ref)
    else:
        assert rel(got, ref) < 1e-6


@pytest.mark.gpu
def test_model_level_dispatch_on_cuda():
    from hfquant.kernels.weight_only import weight_only_linear

    mod = w4_module(512, 256, 128, True, bias=False)
    for m in (1, 2, 16, 300):
        x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
        assert rel(weight_only_linear(x, mod), weight_only_reference(x, mod)) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_int_mm_cuda_matches_reference(bias):
    torch.manual_seed(2)
    lin = torch.nn.Linear(256, 128, bias=bias)
    mod = QuantLinearW8A8.from_float(lin, lin.weight.data).cuda()
    assert tk.w8a8_int_mm_cuda(torch.randn(16, 256, device="cuda"), mod) is None  # _int_mm needs > 16 rows
    x = torch.randn(40, 256, device="cuda")
    assert rel(tk.w8a8_int_mm_cuda(x, mod), w8a8_reference(x, mod)) < 1e-6
