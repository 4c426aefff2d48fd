import pytest
import torch

from hfquant.core.smoothquant import (
    ALPHA_GRID,
    column_absmax,
    fake_w8a8,
    quantize_activation_int8,
    quantize_weight_int8,
    search_alpha,
    smoothing_scales,
)
from hfquant.calibration.smoothing import fold_
from hfquant.kernels.w8a8 import w8a8_int_mm, w8a8_linear, w8a8_reference
from hfquant.nn.w8a8 import QuantLinearW8A8


def outlier_inputs(n=512, cols=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen)
    x[:, [3, 17]] *= 60  # persistent outlier channels, the case SmoothQuant targets
    return x


@pytest.mark.parametrize("arch,pairs", [
    ("llama", [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
               ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]),
    ("opt", [("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
             ("final_layer_norm", ["fc1"])]),
])
def test_smoothing_leaves_fp32_outputs_unchanged(tiny_models, arch, pairs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        blocks = model.model.layers if arch == "llama" else model.model.decoder.layers
        gen = torch.Generator().manual_seed(2)
        for block in blocks:
            for norm, linears in pairs:
                s = torch.rand(64, generator=gen) * 10 + 0.05
                fold_(block.get_submodule(norm), [block.get_submodule(n) for n in linears], s)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_smoothing_reduces_w8a8_error_on_outlier_channels():
    x = outlier_inputs()
    w = torch.randn(32, 64)
    ref = x @ w.t()
    plain = float(((fake_w8a8(x, w) - ref) ** 2).sum())
    s = smoothing_scales(x.abs().amax(0), column_absmax([w]), 0.5)
    smoothed = float(((fake_w8a8(x / s, w * s) - ref) ** 2).sum())
    assert smoothed < plain / 2


def plain_w8a8_error(x, weights, act_absmax, alpha):
    """The smoothed W8A8 error written out in float64, independently of hfquant: ``s_j = max|X_j|^alpha /
    max|W_j|^(1-alpha)`` (max over every weight, both clamped to >= 1e-5; ``alpha=None``: no smoothing), X / s
    rounded to int8 per token, W * s per output channel, error ``sum |x W^T - Xq Wq^T|^2`` over the weights."""
    x = x.double()
    if alpha is None:
        s = torch.ones(x.shape[1], dtype=torch.float64)
    else:
        w_max = torch.stack([w.double().abs().amax(dim=0) for w in weights]).amax(dim=0)
        s = (act_absmax.double().clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    xs = x / s
    sx = (xs.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
    xq = torch.clamp(torch.round(xs / sx), -127, 127) * sx
    total = 0.0
    for w in weights:
        w = w.double()
        ws = w * s
        sw = (ws.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
        wq = torch.clamp(torch.round(ws / sw), -127, 127) * sw
        total += float(((xq @ wq.t() - x @ w.t()) ** 2).sum())
    return total


def test_alpha_search_errors_and_choice_match_a_plain_reimplementation():
    x = outlier_inputs()
    gen = torch.Generator().manual_seed(5)
    ws = [torch.randn(16, 64, generator=gen), torch.randn(8, 64, generator=gen)]
    act = x.abs().amax(0)
    best, errors = search_alpha(x, ws, act)
    assert list(errors) == list(ALPHA_GRID)
    want = {a: plain_w8a8_error(x, ws, act, a) for a in ALPHA_GRID}
    assert errors == pytest.approx(want, rel=1e-4)
    assert best == min(want, key=want.get) == 0.5
    ordered = sorted(want.values())
    assert ordered[0] < 0.9 * ordered[1]  # a clear minimum: the argmin is not decided by float noise
    # the ends of the range too, on a grid of the caller's
    best, errors = search_alpha(x, ws, act, grid=(0.0, 0.5, 1.0))
    assert best == 0.5
    assert errors == pytest.approx({a: plain_w8a8_error(x, ws, act, a) for a in (0.0, 0.5, 1.0)}, rel=1e-4)


def test_chosen_alpha_beats_no_migration_on_an_activation_outlier_channel():
    """One channel 100x the others: without smoothing (or with alpha=0, which only rescales by the weights)
    the per-token activation grid is set by the outlier and the other channels lose their bits."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 64, generator=gen)
    x[:, 11] *= 100
    ws = [torch.randn(32, 64, generator=gen)]
    act = x.abs().amax(0)
    best, errors = search_alpha(x, ws, act)
    assert errors[best] < plain_w8a8_error(x, ws, act, 0.0) / 20
    assert errors[best] < plain_w8a8_error(x, ws, act, None) / 20
    plain = float(((fake_w8a8(x, ws[0]) - x @ ws[0].t()) ** 2).sum())  # hfquant's own unsmoothed W8A8
    assert plain == pytest.approx(plain_w8a8_error(x, ws, act, None), rel=1e-4)


def test_int8_grids():
    w = torch.randn(8, 40)
    q, s = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.allclose(q.float() * s[:, None], w, atol=float(s.max()) / 2 + 1e-6)
    x = torch.randn(3, 5, 40)
    qx, sx = quantize_activation_int8(x)
    assert sx.shape == (3, 5, 1) and (qx.abs().amax(-1) == 127).all()


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (3, 33, 64)])
def test_int_mm_path_is_bit_identical_to_reference(static, shape):
    lin = torch.nn.Linear(64, 48)
    m = QuantLinearW8A8.from_float(lin, lin.weight.data, input_scale=0.1 if static else None)  # covers |x| <= 12.7
    x = torch.randn(*shape) * 3
    assert torch.equal(w8a8_int_mm(x, m), w8a8_reference(x, m))
    assert torch.equal(w8a8_linear(x, m), w8a8_reference(x, m))
    y, y_float = w8a8_reference(x, m), lin(x).detach()
    assert float((y - y_float).norm() / y_float.norm()) < 0.05


def _w8a8_gemv_or_skip():
    from hfquant.kernels import cpu_ext

    ext = cpu_ext.extension()
    if ext is None or not hasattr(ext, "w8a8_gemv"):
        pytest.skip("hfquant's CPU extension has no W8A8 GEMV here (no compiler or no AVX512-VNNI)")


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("in_f,out_f,bias", [(64, 48, True), (576, 192, False), (100, 33, True), (4096, 20, True)])
@pytest.mark.parametrize("build", ["native", "avx2"])
def test_cpu_w8a8_gemv_is_bit_identical_to_reference(static, in_f, out_f, bias, build, monkeypatch):
    from test_kernels import use_build

    from hfquant.kernels.w8a8 import w8a8_cpu_gemv

    use_build(build, monkeypatch)
    _w8a8_gemv_or_skip()
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    m = QuantLinearW8A8.from_float(lin, lin.weight.data, input_scale=0.1 if static else None)
    for x in (torch.randn(1, in_f) * 3, torch.randn(1, 1, in_f) * 40, torch.zeros(1, in_f)):  # 40: clamps if static
        assert torch.equal(w8a8_cpu_gemv(x, m), w8a8_reference(x, m))
        assert torch.equal(w8a8_linear(x, m), w8a8_cpu_gemv(x, m))  # dispatched for one float32 row
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, in_f)
        x[0, in_f // 2] = bad
        if static and bad == float("inf"):  # a static scale saturates: inf is clamped to 127, as the reference does
            assert torch.equal(w8a8_cpu_gemv(x, m), w8a8_reference(x, m))
        else:
            assert not torch.isfinite(w8a8_cpu_gemv(x, m)).any()  # never silently finite


@pytest.mark.parametrize("build", ["native", "avx2"])
def test_cpu_int8_gemm_is_exact(build, monkeypatch):
    """hfquant's int8 GEMM (the W8A8 path for many rows where ``_int_mm`` is slow) computes ``a @ w^T`` in int32
    exactly: the extremes -128 x -128 included, and shapes with tails in every dimension (rows not a multiple of
    the micro-kernel's 3, outputs not a multiple of 4 or of a 64-row block, columns not a multiple of 16 or of a
    1024-column block)."""
    from test_kernels import use_build

    ext = use_build(build, monkeypatch)
    if not hasattr(ext, "w8a8_int_gemm"):
        pytest.skip("hfquant's CPU extension has no int8 GEMM here (no AVX2)")
    torch.manual_seed(0)
    for m, k, n in [(1, 16, 4), (5, 33, 7), (37, 576, 200), (3, 2050, 67), (64, 1000, 130), (2, 7, 3)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        a[0], w[0] = -128, -128
        c = ext.w8a8_int_gemm(a, w)
        assert c.dtype == torch.int32 and torch.equal(c.long(), a.long() @ w.long().t()), (m, k, n)
    assert ext.w8a8_int_gemm(torch.zeros(0, 16, dtype=torch.int8), torch.ones(4, 16, dtype=torch.int8)).shape == (0, 4)
    with pytest.raises(RuntimeError, match="same number of columns"):
        ext.w8a8_int_gemm(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(4, 15, dtype=torch.int8))


@pytest.mark.parametrize("mode", ["int", "tiles", "auto"])
def test_many_rows_without_vnni_match_the_reference(mode, monkeypatch):
    """Without AVX512-VNNI, W8A8 with several rows runs hfquant's int8 GEMM (bit-identical to the reference) or
    the float32 tiles (float32 sums), as ``HFQUANT_CPU_W8A8`` says; ``auto`` times both once per shape class."""
    import hfquant.kernels.w8a8 as k
    from hfquant.kernels.isa import cpu_isa

    monkeypatch.setenv("HFQUANT_ISA", "avx2")
    monkeypatch.setenv("HFQUANT_CPU_W8A8", mode)
    monkeypatch.setattr(k, "_MANY_ROWS_CHOICE", {})
    cpu_isa.cache_clear()
    try:
        if cpu_isa() != "avx2":
            pytest.skip("this CPU cannot run as avx2")
        torch.manual_seed(0)
        lin = torch.nn.Linear(600, 70)
        m = QuantLinearW8A8.from_float(lin, lin.weight.data)
        x = torch.randn(3, 11, 600) * 3
        ref = k.w8a8_reference(x, m)
        y = k.w8a8_linear(x, m)
        if mode == "int" and k._int_gemm_kernel() is not None:
            assert torch.equal(y, ref)
        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-6
        assert list(k._MANY_ROWS_CHOICE.values()) == ([] if mode != "auto" else [k._MANY_ROWS_CHOICE[(600, 70, 6)]])
        monkeypatch.setenv("HFQUANT_CPU_W8A8", "fastest")
        with pytest.raises(ValueError, match="HFQUANT_CPU_W8A8"):
            k.w8a8_linear(x, m)
    finally:
        monkeypatch.delenv("HFQUANT_ISA")
        cpu_isa.cache_clear()


@pytest.mark.parametrize("isa,int_mm", [("avx2", False), ("avx512", False), ("avx512-vnni", True)])
def test_many_rows_use_int_mm_only_where_it_is_fast(isa, int_mm, monkeypatch):
    """Without AVX512-VNNI torch's ``_int_mm`` is a plain loop (two orders of magnitude slower than float32), so
    W8A8 prefill multiplies the codes in float32 tiles there; both match the exact reference."""
    import hfquant.kernels.w8a8 as k
    from hfquant.kernels.isa import cpu_isa

    monkeypatch.setenv("HFQUANT_ISA", isa)
    cpu_isa.cache_clear()
    try:
        if cpu_isa() != isa:
            pytest.skip(f"this CPU cannot run as {isa}")
        calls = []
        real = torch._int_mm
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
        torch.manual_seed(0)
        lin = torch.nn.Linear(576, 200)
        m = QuantLinearW8A8.from_float(lin, lin.weight.data)
        x = torch.randn(2, 37, 576) * 3
        ref = k.w8a8_reference(x, m)
        y = k.w8a8_linear(x, m)
        assert bool(calls) == int_mm
        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-6
        tiles = k.w8a8_float_tiles(x, m, tile=48)  # several tiles, a partial last one
        assert ((tiles - ref).abs().max() / ref.abs().max()) < 1e-6
    finally:
        monkeypatch.delenv("HFQUANT_ISA")
        cpu_isa.cache_clear()


def test_bert_post_norm_is_reported_not_smoothed(tiny_models):
    from transformers import AutoModel

    from hfquant import HFQuantConfig

    model = AutoModel.from_pretrained(tiny_models["bert"], quantization_config=HFQuantConfig(
        method="smoothquant", alpha=0.5, num_samples=4, seq_len=32, calibration_batch_size=2))
    mods = {m["name"]: m for m in model.hfquant_report["modules"]}
    inter = mods["encoder.layer.1.intermediate.dense"]  # reads attention.output.LayerNorm, which also feeds the residual
    assert not inter["smoothed"] and "changes the block output" in inter["note"]
    assert not mods["encoder.layer.1.attention.self.query"]["smoothed"]  # its LayerNorm is in the previous block
    assert not mods["encoder.layer.0.attention.output.dense"]["smoothed"]


def test_llama_groups_are_smoothed_and_reported(tiny_models):
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=HFQuantConfig(
        method="smoothquant", alpha="auto", num_samples=4, seq_len=32, calibration_batch_size=2))
    mods = {m["name"]: m for m in model.hfquant_report["modules"]}
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        r = mods[f"model.layers.0.{n}"]
        assert r["smoothed"] and r["alpha"] in ALPHA_GRID, r
    for n in ("self_attn.o_proj", "mlp.down_proj"):
        assert not mods[f"model.layers.1.{n}"]["smoothed"]


def test_known_family_table_cross_check():
    from hfquant.calibration.smoothing import missing_known_groups

    found = [("input_layernorm", ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")),
             ("post_attention_layernorm", ("mlp.up_proj", "mlp.gate_proj"))]
    assert missing_known_groups("llama", found) == []
    assert missing_known_groups("qwen2", found[:1]) == ["post_attention_layernorm -> mlp.gate_proj, mlp.up_proj"]
    assert missing_known_groups("unknown-family", []) == []
