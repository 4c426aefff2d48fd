"""The CUDA paths of quantized Linears (``hfquant.kernels.cuda_paths``).

On the CPU (CI): the repacking into torch's int4 "tinygemm" layout, checked by de-quantizing what the kernel is given
with the kernel's own formula ``(q - 8) * s + z`` (exactly equal to the module's weight where the scales are exact in
bfloat16, within bfloat16 rounding otherwise), and the timed, recorded choice between the paths (with the GPU's timings
rigged). On a GPU (``gpu`` tests, ``scripts/gpu_check.sh``): the kernels themselves against the reference.
"""

import json

import pytest
import torch

from hfquant.core.grids import rtn_quantize
from hfquant.kernels import cuda_paths
from hfquant.kernels.operands import int4_kernel_inputs
from hfquant.kernels.weight_only import weight_only_reference
from hfquant.nn.weight_only import QuantLinearWeightOnly


def w4_module(in_f, out_f, group, *, sym=False, act_order=False, exact_scales=False, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    codes, scales, zeros, g_idx = rtn_quantize(lin.weight.data, 4, group, sym=sym)
    if exact_scales:  # powers of two: exact in bfloat16, so the repacked weight must equal the module's exactly
        scales = torch.exp2(torch.round(torch.log2(scales)))
    if act_order:  # groups are sets of permuted columns (static groups), g_idx not monotone
        g = in_f if group == -1 else group
        g_idx = (torch.arange(in_f) // g)[torch.argsort(torch.randperm(in_f))].int()
    return QuantLinearWeightOnly.from_float(lin, codes, scales, zeros, g_idx, 4, group)


def tinygemm_weight(module) -> torch.Tensor:
    """The weight torch's int4 CUDA kernel computes with, de-quantized from the uint8 it is packed from
    (``tinygemm_prepack``) and its scale/zero table, in the module's own column order."""
    codes, scale_zero, perm, k_pad, kg = int4_kernel_inputs(module)
    prepacked = cuda_paths.tinygemm_prepack(codes)
    assert prepacked.dtype == torch.uint8 and prepacked.shape == (module.out_features, k_pad // 2)
    q = torch.stack([prepacked >> 4, prepacked & 0xF], dim=-1).reshape(module.out_features, k_pad).float()
    s = scale_zero[..., 0].float().t().repeat_interleave(kg, dim=1)  # [N, k_pad]
    z = scale_zero[..., 1].float().t().repeat_interleave(kg, dim=1)
    w = ((q - 8) * s + z)[:, : module.in_features]
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w


LAYOUTS = [  # (in, out, group): kernel group = group; several kernel groups per group; a padded partial last group;
    (256, 64, 32), (512, 48, 256), (576, 32, 128), (200, 16, 128), (160, 24, -1), (1024, 8, 64)]  # per channel


@pytest.mark.parametrize("in_f,out_f,group", LAYOUTS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_tinygemm_repack_is_the_modules_weight(in_f, out_f, group, sym, act_order):
    exact = w4_module(in_f, out_f, group, sym=sym, act_order=act_order, exact_scales=True)
    assert torch.equal(tinygemm_weight(exact), exact.dequantize(torch.float32))
    rounded = w4_module(in_f, out_f, group, sym=sym, act_order=act_order, seed=1)  # scales rounded to bfloat16
    ref = rounded.dequantize(torch.float32)
    assert float((tinygemm_weight(rounded) - ref).norm() / ref.norm()) < 1e-2


def test_tinygemm_packing_details():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 8, 9]], dtype=torch.int32)
    assert cuda_paths.tinygemm_prepack(codes).tolist() == [[0x12, 0x34], [0xF0, 0x89]]
    assert [cuda_paths.tinygemm_inner_k_tiles(k) for k in (32, 64, 96, 128, 576, 11008)] == [2, 4, 2, 8, 4, 8]
    three_bit = QuantLinearWeightOnly.from_float(torch.nn.Linear(64, 16), *rtn_quantize(torch.randn(16, 64), 3, 32, sym=True),
                                                3, 32)
    assert int4_kernel_inputs(three_bit) is None
    assert int4_kernel_inputs(w4_module(96, 16, 48)) is None  # 48: no kernel group divides it
    # activations other than bfloat16 are not the kernel's: the path declines before touching CUDA
    assert cuda_paths.weight_only_tinygemm(torch.randn(2, 256, dtype=torch.float16), w4_module(256, 64, 32)) is None


@pytest.mark.parametrize("family,paths_fn,choice,run", [
    ("HFQUANT_CUDA_W4A16", "_w4a16_paths", "_W4A16_CHOICE", "weight_only_cuda"),
    ("HFQUANT_CUDA_W8A8", "_w8a8_paths", "_W8A8_CHOICE", "w8a8_cuda")])
def test_cuda_choice_is_timed_once_and_recorded_per_gpu(monkeypatch, tmp_path, family, paths_fn, choice, run):
    """The first process on a machine times the paths of a shape class (GPU name included in the class) and records
    the fastest; a fresh process takes the recorded path even where its own timing would differ. The GPU and its
    kernels are stand-ins here (CPU functions with rigged timings); the real ones run in the ``gpu`` tests."""
    import hfquant.kernels.choices as record
    import hfquant.kernels.common as common

    monkeypatch.delenv(family, raising=False)
    monkeypatch.setenv("HFQUANT_CPU_CHOICES", str(tmp_path / "paths.json"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU 80GB")
    monkeypatch.setattr(cuda_paths, "_GPU_NAMES", {})
    names = list(getattr(cuda_paths, paths_fn)())
    fakes = {n: (lambda x, module, _i=i: torch.full((x.shape[0], 4), float(_i))) for i, n in enumerate(names)}
    monkeypatch.setattr(cuda_paths, paths_fn, lambda: fakes)
    module = w4_module(256, 64, 32)
    real_time = common._time_path
    outputs = []
    for fast in (names[1], names[0]):  # the first process finds the second path fastest, a later one the first
        monkeypatch.setattr(cuda_paths, choice, {})
        monkeypatch.setattr(record, "_STATE", {})
        monkeypatch.setattr(common, "_time_path", lambda fn, x, m, _f=fakes[fast]: (
            0.0 if fn is _f else 1.0, real_time(fn, x, m)[1]))
        monkeypatch.setattr(common, "float_baseline", lambda module: lambda x, m: x)
        outputs.append(getattr(cuda_paths, run)(torch.randn(3, 256), module))
    assert torch.equal(outputs[0], outputs[1]) and float(outputs[0][0, 0]) == 1.0
    saved = json.loads((tmp_path / "paths.json").read_text())
    assert len(saved) == 1
    (key, entry), = saved.items()
    assert key.startswith(f"{family}|Test GPU 80GB,256,64,") and entry["path"] == names[1]


def test_cuda_path_can_be_forced_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(cuda_paths, "_GPU_NAMES", {})
    monkeypatch.setattr(cuda_paths, "_w4a16_paths", lambda: {"tinygemm": lambda x, m: x + 1, "triton": lambda x, m: x})
    x = torch.zeros(1, 256)
    monkeypatch.setenv("HFQUANT_CUDA_W4A16", "tinygemm")
    assert float(cuda_paths.weight_only_cuda(x, w4_module(256, 64, 32)).sum()) == 256.0
    monkeypatch.setenv("HFQUANT_CUDA_W4A16", "marlin")
    with pytest.raises(ValueError, match=r"HFQUANT_CUDA_W4A16='marlin'; expected reproducible .* \['tinygemm', 'triton'\]"):
        cuda_paths.weight_only_cuda(x, w4_module(256, 64, 32))


# ------------------------------------------------------------------------------------------ on a GPU


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.gpu
@pytest.mark.parametrize("in_f,out_f,group", LAYOUTS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m", [1, 16, 77])
def test_tinygemm_matches_reference_on_cuda(in_f, out_f, group, act_order, m):
    module = w4_module(in_f, out_f, group, act_order=act_order, bias=True).cuda()
    x = torch.randn(2, m, in_f, device="cuda", dtype=torch.bfloat16)
    got = cuda_paths.weight_only_tinygemm(x, module)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (2, m, out_f)
    assert rel(got, weight_only_reference(x.float(), module)) < 1e-2


@pytest.mark.gpu
def test_model_dispatch_on_cuda_takes_a_timed_path_per_dtype(monkeypatch, tmp_path):
    monkeypatch.setenv("HFQUANT_CPU_CHOICES", str(tmp_path / "paths.json"))
    module = w4_module(1024, 512, 128, bias=True).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(5, 1024, device="cuda", dtype=dtype)
        assert rel(module(x), weight_only_reference(x.float(), module)) < 1e-2
    saved = json.loads((tmp_path / "paths.json").read_text())
    fp16 = [e["path"] for k, e in saved.items() if ",float16," in k]
    assert fp16 == ["triton"]  # tinygemm takes bfloat16 only
