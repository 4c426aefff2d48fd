import pytest
import torch
from helpers import make_module, rel_err, use_build

from hfquant.kernels.weight_only import weight_only_cpu_int4, weight_only_linear, weight_only_reference
from hfquant.nn.weight_only import QuantLinearWeightOnly


@pytest.mark.parametrize("in_f,out_f,group", [(576, 960, 128), (576, 1536, 64), (1536, 576, 128), (256, 96, 32),
                                              (200, 64, 64), (512, 128, 256), (160, 48, -1), (1024, 64, 512)])
@pytest.mark.parametrize("m", [1, 7, 64, 512])
@pytest.mark.parametrize("act_perm", [False, True])
def test_cpu_int4_matches_reference(in_f, out_f, group, m, act_perm):
    mod = make_module(in_f, out_f, group=group, act_perm=act_perm)
    x = torch.randn(m, in_f)
    ref = weight_only_reference(x, mod)
    fast = weight_only_cpu_int4(x, mod)
    assert fast is not None
    # Stated tolerance: the kernel takes bf16 activations, ~3e-3 relative error; allow 1e-2.
    rel = float((fast - ref).norm() / ref.norm())
    assert rel < 1e-2, rel


def test_dispatch_falls_back_for_other_bits_and_dtypes():
    mod = make_module(96, 32, bits=3, group=32)
    assert weight_only_cpu_int4(torch.randn(2, 96), mod) is None
    x3 = torch.randn(2, 96)
    assert torch.equal(weight_only_linear(x3, mod), weight_only_reference(x3, mod))
    per_channel = make_module(128, 32, group=-1)  # runs as 4 kernel groups of 32 sharing each row's scale
    x = torch.randn(2, 128)
    assert rel_err(weight_only_cpu_int4(x, per_channel), weight_only_reference(x, per_channel)) < 1e-2
    odd = make_module(100, 32, group=-1)  # K=100: no kernel group size divides it, the reference runs
    assert weight_only_cpu_int4(torch.randn(2, 100), odd) is None
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert weight_only_linear(x, per_channel).dtype == torch.bfloat16


def test_batched_3d_input_and_cache_invalidation():
    mod = make_module(256, 64, group=64)
    x = torch.randn(2, 5, 256)
    assert rel_err(weight_only_linear(x, mod), weight_only_reference(x, mod)) < 1e-2
    mod.scales.data = mod.scales.data * 2  # new tensor: the cached operands must be rebuilt
    assert rel_err(weight_only_linear(x, mod), weight_only_reference(x, mod)) < 1e-2
    other = make_module(256, 64, group=64, seed=1)
    mod.load_state_dict(other.state_dict())  # in-place copies: same pointers, new version counters
    assert rel_err(weight_only_linear(x, mod), weight_only_reference(x, other)) < 1e-2


def test_few_rows_and_bf16_use_the_int4_kernel_and_odd_layouts_the_exact_reference(monkeypatch):
    monkeypatch.setenv("HFQUANT_CPU_PREFILL", "int4")
    mod = make_module(256, 64, group=64)
    x = torch.randn(2, 15, 256)  # more than one row: the prefill choice, here forced to int4
    assert torch.equal(weight_only_linear(x, mod), weight_only_cpu_int4(x, mod))
    assert rel_err(weight_only_linear(x, mod), weight_only_reference(x, mod)) < 1e-2
    xb = torch.randn(4, 32, 256, dtype=torch.bfloat16)  # bf16 activations, many rows: torch's kernel too
    assert torch.equal(weight_only_linear(xb, mod), weight_only_cpu_int4(xb, mod))
    odd = make_module(200, 64, group=100)  # groups of 100 columns: no int4 kernel, the reference runs
    x = torch.randn(3, 200)
    assert torch.equal(weight_only_linear(x, odd), weight_only_reference(x, odd))


@pytest.mark.parametrize("bits,group,act_perm", [(4, 128, False), (4, 64, True), (3, 48, False), (2, 32, False),
                                                 (8, -1, False), (4, 100, False)])
def test_dequantize_matches_the_gather_formula(bits, group, act_perm):
    mod = make_module(200, 24, bits=bits, group=group, act_perm=act_perm)
    idx = mod.g_idx.long()
    expected = mod.scales.float()[:, idx] * (mod.codes().float() - mod.zeros.float()[:, idx])
    assert torch.equal(mod.dequantize(torch.float32), expected)


def test_operands_are_built_at_load_time(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=HFQuantConfig(
        method="rtn", group_size=32))
    mods = [m for m in model.modules() if isinstance(m, QuantLinearWeightOnly)]
    assert mods and all(m._kernel_cache.get("cpu_int4", (None, None))[1] is not None for m in mods)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    mods = [m for m in reloaded.modules() if isinstance(m, QuantLinearWeightOnly)]
    assert mods and all(m._kernel_cache.get("cpu_int4", (None, None))[1] is not None for m in mods)


def _gemv_or_skip():
    from hfquant.kernels import cpu_ext

    if cpu_ext.extension() is None:
        pytest.skip("hfquant's CPU extension is not available here (no compiler or no AVX-512)")


@pytest.fixture(params=["native", "no-vnni", "avx2"])
def gemv_kernel(request, monkeypatch):
    """The kernel as built for this machine, and the copies built for smaller x86 levels, swapped in for the test."""
    return use_build(request.param, monkeypatch)


@pytest.mark.parametrize("in_f,out_f,group,act_perm", [(576, 960, 128, False), (576, 1536, 64, True), (4096, 64, 128, False),
                                                       (160, 66, -1, False), (96, 40, 32, True), (1536, 576, 256, False),
                                                       (100, 33, 32, False)])
def test_cpu_gemv_extension_matches_reference(gemv_kernel, in_f, out_f, group, act_perm):
    from hfquant.kernels.weight_only import weight_only_cpu_gemv

    mod = make_module(in_f, out_f, group=group, act_perm=act_perm)
    for m in (1, 3):  # the kernel takes any row count; dispatch uses it for one row
        x = torch.randn(m, in_f)
        assert rel_err(weight_only_cpu_gemv(x, mod), weight_only_reference(x, mod)) < 1e-5  # float32-level accuracy
    x = torch.randn(1, 1, in_f)
    x[..., 7] *= 1000  # an outlier channel: the int8 split is per 128 columns, its block keeps ~21 bits
    assert rel_err(weight_only_cpu_gemv(x, mod), weight_only_reference(x, mod)) < 1e-5
    assert torch.equal(weight_only_linear(x, mod), weight_only_cpu_gemv(x, mod))


def test_cpu_gemv_zero_and_non_finite_inputs(gemv_kernel):
    from hfquant.kernels.weight_only import weight_only_cpu_gemv

    mod = make_module(576, 64, group=128)
    zero = torch.zeros(1, 576)
    assert torch.allclose(weight_only_cpu_gemv(zero, mod), mod.bias[None], atol=0)  # only the bias is left
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 576)
        x[0, 300] = bad
        fast, ref = weight_only_cpu_gemv(x, mod), weight_only_reference(x, mod)
        assert not torch.isfinite(ref).any() and not torch.isfinite(fast).any()  # never silently finite


@pytest.mark.parametrize("in_f,out_f,group,act_perm", [(576, 960, 128, False), (576, 1536, 64, True), (160, 66, -1, False),
                                                       (96, 40, 32, True), (100, 33, 32, False)])
@pytest.mark.parametrize("tile", [None, 7, 64])  # None: the default (whole W here); 7: several tiles, a partial last one
def test_cpu_dequant_mm_matches_reference(gemv_kernel, in_f, out_f, group, act_perm, tile, monkeypatch):
    from hfquant.kernels.weight_only import weight_only_cpu_dequant_mm

    mod = make_module(in_f, out_f, group=group, act_perm=act_perm)
    x = torch.randn(2, 37, in_f)
    ref = weight_only_reference(x, mod)
    fast = weight_only_cpu_dequant_mm(x, mod, tile)
    assert fast.shape == ref.shape == (2, 37, out_f)
    assert rel_err(fast, ref) < 1e-6  # the same float32 weights and GEMM: float32 rounding only
    if tile is None:
        monkeypatch.setenv("HFQUANT_CPU_PREFILL", "tiles")
        assert torch.equal(weight_only_linear(x, mod), fast)  # dispatched for many float32 rows when forced


@pytest.mark.parametrize("in_f,out_f,group,act_perm", [(576, 960, 128, False), (576, 1536, 64, True), (160, 66, -1, False),
                                                       (96, 40, 32, True), (100, 33, 32, False), (1536, 70, 256, False)])
def test_cpu_int16_mm_matches_reference(gemv_kernel, in_f, out_f, group, act_perm):
    """hfquant's int16-activation GEMM for many rows: x rounded to int16 per row and group (15 bits of the group's
    largest value), exact int32 sums with the codes. Within 3e-4 of the float32 reference with a 1000x outlier
    channel (its groups keep the fewest bits), within 3e-5 without; NaN/inf never give finite outputs."""
    from hfquant.kernels.weight_only import weight_only_cpu_int16_mm

    mod = make_module(in_f, out_f, group=group, act_perm=act_perm)
    if not hasattr(gemv_kernel, "weight_only_int16_mm"):
        pytest.skip("this build has no int16 GEMM (no AVX2)")
    for rows, outlier, tol in ((1, False, 3e-5), (37, False, 3e-5), (74, True, 3e-4)):
        x = torch.randn(rows, in_f)
        if outlier:
            x[:, 7] *= 1000
        fast, ref = weight_only_cpu_int16_mm(x, mod), weight_only_reference(x, mod)
        assert fast.shape == ref.shape and rel_err(fast, ref) < tol
    zero = torch.zeros(5, in_f)
    assert torch.equal(weight_only_cpu_int16_mm(zero, mod), mod.bias.expand(5, out_f))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, in_f)
        x[2, in_f // 2] = bad
        y = weight_only_cpu_int16_mm(x, mod)
        assert not torch.isfinite(y[2]).any() and torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("in_f,out_f,group,act_perm", [(576, 960, -1, False), (576, 130, 128, False), (576, 64, 64, True),
                                                       (100, 33, -1, False), (200, 40, 48, True), (1536, 24, 256, False)])
def test_8bit_codes_take_the_cpu_kernels_and_match_the_reference(gemv_kernel, in_f, out_f, group, act_perm):
    """8-bit codes (an int8 lm_head, ``bits: auto``'s 8-bit modules): one row through the 4-bit GEMV with x
    spread to (x, 16x), more rows through the int16 GEMM (codes one a byte) where the groups allow, else dequantized
    tiles; each against the reference."""
    from hfquant.kernels.weight_only import weight_only_cpu_dequant_mm, weight_only_cpu_gemv, weight_only_cpu_int16_mm

    mod = make_module(in_f, out_f, bits=8, group=group, act_perm=act_perm)
    x = torch.randn(1, 1, in_f)
    x[..., 5] *= 1000  # an outlier channel
    fast = weight_only_cpu_gemv(x, mod)
    assert fast is not None and fast.shape == (1, 1, out_f)
    assert rel_err(fast, weight_only_reference(x, mod)) < 1e-5
    assert torch.equal(weight_only_linear(x, mod), fast)
    for shape in ((3, in_f), (2, 37, in_f)):  # few and many rows: the tiles, not the reference's whole W
        x = torch.randn(*shape)
        ref = weight_only_reference(x, mod)
        tiles = weight_only_cpu_dequant_mm(x, mod, 16)  # several tiles, a partial last one
        assert tiles.shape == ref.shape and rel_err(tiles, ref) < 1e-6
        int16 = weight_only_cpu_int16_mm(x, mod)  # kernel groups of <= 256 columns: all but the 48-column groups
        if hasattr(gemv_kernel, "weight_only_int16_mm") and group != 48:
            assert int16.shape == ref.shape and rel_err(int16, ref) < 1e-4  # x: 15 bits per kernel group
        else:
            assert int16 is None
        y = weight_only_linear(x, mod)  # the machine's recorded choice: one of the two
        assert torch.equal(y, weight_only_cpu_dequant_mm(x, mod)) or (int16 is not None and torch.equal(y, int16))


def test_prefill_fastest_keeps_the_faster_path_per_shape_class(monkeypatch):
    """``HFQUANT_CPU_PREFILL=fastest`` (opt-in): the first call of a shape class times the dequantized tiles, torch's
    int4 kernel and the int16 GEMM and returns the fastest one's output; later calls of the class take that path
    without timing. ``auto`` is the same (its old name); an unknown value is refused."""
    import hfquant.kernels.weight_only as k

    _gemv_or_skip()
    monkeypatch.setenv("HFQUANT_CPU_PREFILL", "fastest")
    monkeypatch.setattr(k, "_PREFILL_CHOICE", {})
    slow = {"tiles": 0.0, "int4": 0.05, "int16": 0.05}  # make int4 and int16 lose the timing
    real = k._prefill_paths()

    def slowed(name):
        def run(x, module):
            import time

            time.sleep(slow[name])
            return real[name](x, module)
        return run
    monkeypatch.setattr(k, "_prefill_paths", lambda: {name: slowed(name) for name in real})
    mod = make_module(256, 64, group=128)
    x = torch.randn(40, 256)
    assert torch.equal(k.weight_only_linear(x, mod), real["tiles"](x, mod))
    assert list(k._PREFILL_CHOICE.values()) == ["tiles"]
    slow.update(tiles=0.05, int4=0.0, int16=0.1)  # the choice is kept: no new timing for this class
    x2 = torch.randn(50, 256)  # 50 rows: the same class as 40 (32..63)
    assert torch.equal(k.weight_only_linear(x2, mod), real["tiles"](x2, mod))
    assert list(k._PREFILL_CHOICE.values()) == ["tiles"]
    monkeypatch.setenv("HFQUANT_CPU_PREFILL", "auto")  # the old name of the timed choice: the same choices
    x = torch.randn(300, 256)  # a new class (rows 256..511): timed again, int4 now faster
    assert torch.equal(k.weight_only_linear(x, mod), real["int4"](x, mod))
    assert sorted(k._PREFILL_CHOICE.values()) == ["int4", "tiles"]
    monkeypatch.setenv("HFQUANT_CPU_PREFILL", "fast")
    with pytest.raises(ValueError, match="HFQUANT_CPU_PREFILL"):
        k.weight_only_linear(x, mod)


@pytest.mark.parametrize("favoured", ["tiles", "int4", "int16"])
def test_the_default_prefill_choice_is_recorded_once_per_machine(favoured, monkeypatch, tmp_path):
    """By default (``HFQUANT_CPU_PREFILL`` unset) the first process to meet a shape class times the accurate candidates
    (int16 GEMM, tiles; never torch's int4 kernel and its bf16 activations) and records the choice in the machine's
    file; a second, fresh process takes the recorded path even where its own timing would say otherwise, so both
    compute the same numbers. Here the timings are rigged: the first process sees ``favoured`` as instant, the second
    the other accurate path. (Before, each process timed for itself and the two took different paths.)"""
    import json

    import hfquant.kernels.choices as record
    import hfquant.kernels.common as common
    import hfquant.kernels.weight_only as k

    _gemv_or_skip()
    monkeypatch.delenv("HFQUANT_CPU_PREFILL", raising=False)
    monkeypatch.setenv("HFQUANT_CPU_CHOICES", str(tmp_path / "paths.json"))
    real_time = common._time_path
    paths = k._prefill_paths()
    monkeypatch.setattr(k, "_prefill_paths", lambda: paths)
    mod = make_module(512, 96, group=128)
    x = torch.randn(2, 37, 512)
    outputs = []
    for rigged_for in (favoured, "tiles" if favoured == "int16" else "int16"):
        monkeypatch.setattr(k, "_PREFILL_CHOICE", {})  # a fresh process: nothing chosen, the record not yet read
        monkeypatch.setattr(record, "_STATE", {})

        def rigged(fn, x, module, _fast=paths[rigged_for]):  # the rigged path seems instant, the others slow
            seconds, y = real_time(fn, x, module)
            return (0.0 if fn is _fast else 1.0 + seconds), y
        monkeypatch.setattr(common, "_time_path", rigged)
        outputs.append(k.weight_only_linear(x, mod))
    chosen = "tiles" if favoured == "tiles" else "int16"  # int4 is not a default candidate: the real timing decides
    saved = json.loads((tmp_path / "paths.json").read_text())
    assert [e["path"] for e in saved.values()] == ([chosen] if favoured != "int4" else [next(iter(saved.values()))["path"]])
    chosen = next(iter(saved.values()))["path"]
    assert chosen in ("int16", "tiles")
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], paths[chosen](x, mod))
    assert rel_err(outputs[0], weight_only_reference(x, mod)) < 1e-4


def test_a_timed_choice_slower_than_float32_warns_once(monkeypatch):
    """Where even the fastest quantized path is slower than float32 ``F.linear`` (timed in the same first call of
    the shape class; e.g. a CPU without AVX2), one warning says so; a path faster than float32, or a layer so
    small that float32 takes under ``SLOWER_THAN_FLOAT_MIN_SECONDS``, warns nothing."""
    import warnings

    import hfquant.kernels.common as common
    import hfquant.kernels.weight_only as k

    monkeypatch.setenv("HFQUANT_CPU_PREFILL", "fastest")
    monkeypatch.setattr(k, "_PREFILL_CHOICE", {})
    monkeypatch.setattr(common, "_SLOWER_THAN_FLOAT_WARNED", set())
    monkeypatch.setattr(common, "SLOWER_THAN_FLOAT_MIN_SECONDS", 0.0)  # the tiny layer's float32 time counts here
    real = k._prefill_paths()

    def slowed(x, module):
        import time

        time.sleep(0.2)  # far slower than a 40 x 256 x 64 float32 product
        return real["int4"](x, module)
    monkeypatch.setattr(k, "_prefill_paths", lambda: {"int4": slowed})
    mod = make_module(256, 64, group=128)
    x = torch.randn(40, 256)
    with pytest.warns(RuntimeWarning, match=r"W4A16 256x64 Linear at 40 rows \(int4, fastest\) ran at 0\.\d\dx the speed of float32"):
        y = k.weight_only_linear(x, mod)
    assert torch.equal(y, real["int4"](x, mod))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k.weight_only_linear(torch.randn(50, 256), mod)  # the same shape class: chosen before, not timed again
        instant = torch.zeros(3, 64)
        monkeypatch.setattr(k, "_prefill_paths", lambda: {"int4": lambda x, module: instant})
        # a new class, a path faster than float32: no warning
        assert k.weight_only_linear(torch.randn(3, 256), mod) is instant
    monkeypatch.setattr(common, "_SLOWER_THAN_FLOAT_WARNED", set())
    monkeypatch.setattr(k, "_prefill_paths", lambda: {"int4": slowed})
    monkeypatch.setattr(common, "SLOWER_THAN_FLOAT_MIN_SECONDS", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # slower, but float32 takes under the threshold: Python's overhead
        k.weight_only_linear(torch.randn(5, 256), mod)


def test_8bit_group_the_kernel_cannot_take_falls_back_to_the_reference():
    _gemv_or_skip()
    mod = make_module(120, 16, bits=8, group=40)  # 40 columns: not a multiple of 16
    x = torch.randn(1, 120)
    assert torch.equal(weight_only_linear(x, mod), weight_only_reference(x, mod))


def test_dispatch_without_the_extension_and_for_odd_shapes(monkeypatch):
    from hfquant.kernels import cpu_ext
    from hfquant.kernels.weight_only import weight_only_cpu_dequant_mm, weight_only_cpu_int16_mm

    mod = make_module(256, 66, group=64)  # N = 66: torch's int4 packing needs N % 16 == 0
    assert weight_only_cpu_int4(torch.randn(2, 256), mod) is None
    x = torch.randn(2, 256)
    int16 = weight_only_cpu_int16_mm(x, mod)  # hfquant's kernels take any N: the int16 GEMM or the tiles
    y = weight_only_linear(x, mod)
    assert int16 is None or torch.equal(y, int16) or torch.equal(y, weight_only_cpu_dequant_mm(x, mod))
    monkeypatch.setitem(cpu_ext._STATE, "ext", None)  # as on a machine where it cannot be built
    mod = make_module(256, 64, group=64)
    x = torch.randn(1, 256)
    assert torch.equal(weight_only_linear(x, mod), weight_only_cpu_int4(x, mod))


def test_portable_paths_on_a_cpu_without_hfquants_kernels(monkeypatch):
    """A CPU below AVX2 (ARM, or ``HFQUANT_ISA=other``): no C++ extension; W4A16 takes the prefill choice (torch's
    int4 kernel is the only path left) from one row on, W8A8 the float32 tiles; both against the reference."""
    import hfquant.kernels.weight_only as k4
    import hfquant.kernels.w8a8 as k8
    from hfquant.kernels import cpu_ext
    from helpers import running_as
    from hfquant.nn.w8a8 import QuantLinearW8A8

    monkeypatch.delenv("HFQUANT_CPU_PREFILL", raising=False)
    monkeypatch.delenv("HFQUANT_CPU_W8A8", raising=False)
    monkeypatch.setattr(cpu_ext, "_STATE", {})
    monkeypatch.setattr(k4, "_PREFILL_CHOICE", {})
    monkeypatch.setattr(k8, "_MANY_ROWS_CHOICE", {})
    with running_as("other", monkeypatch):
        assert cpu_ext.extension() is None
        mod = make_module(256, 64, group=128)
        lin = torch.nn.Linear(256, 48)
        w8 = QuantLinearW8A8.from_float(lin, lin.weight.data)
        for rows in (1, 40):
            x = torch.randn(rows, 256)
            assert rel_err(weight_only_linear(x, mod), weight_only_reference(x, mod)) < 1e-2
            assert rel_err(k8.w8a8_linear(x, w8), k8.w8a8_reference(x, w8)) < 1e-6
        x = torch.randn(40, 256)
        # the fallback: no candidate takes it
        assert torch.equal(weight_only_linear(x, mod), weight_only_cpu_int4(x, mod))
        assert k4._PREFILL_CHOICE == {} and set(k8._MANY_ROWS_CHOICE.values()) == {"tiles"}
