import pytest
import torch

from hfquant.core.smoothquant import (
    ALPHA_GRID,
    column_absmax,
    quantize_activation_int8,
    quantize_weight_int8,
    smoothing_scales,
)
from helpers import running_as
from hfquant.quantize.smoothing import fold_
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
    act = x.abs().amax(0)
    assert plain_w8a8_error(x, [w], act, 0.5) < plain_w8a8_error(x, [w], act, None) / 2
    # smoothing_scales is the formula the plain version writes out
    s = smoothing_scales(act, column_absmax([w]), 0.5)
    w_max = w.double().abs().amax(dim=0)
    torch.testing.assert_close(s.double(), (act.double() ** 0.5 / w_max ** 0.5).clamp(min=1e-5), rtol=1e-5, atol=0)


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


def _llama_block_check(tiny_models, outlier_channel=None, arch="llama", norm_name="input_layernorm"):
    """Block 0 of a tiny model (Llama by default) with its first calibration batch, the group fed by ``norm_name``
    and that input's abs-max: what the alpha search sees. ``outlier_channel``: scale that channel of the norm by
    50 first."""
    from transformers import AutoModelForCausalLM

    from hfquant.nn.graph import find_blocks, quantizable_modules
    from hfquant.calibration.blocks import call_block, capture_block_inputs, discover_groups
    from hfquant.quantize.smoothing import find_producers
    from hfquant.quantize.w8a8 import _BlockCheck

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    _, blocks = find_blocks(model)
    block = blocks[0]
    if outlier_channel is not None:
        block.get_submodule(norm_name).weight.data[outlier_channel] *= 50
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)]
    inputs = capture_block_inputs(model, block, batches)
    modules = quantizable_modules(block, lambda _n: True, prefix="block")
    groups, _ = discover_groups(block, modules, inputs)
    groups = find_producers(block, groups, lambda: call_block(block, inputs[0]))
    g = next(g for g in groups if g.norm_name == norm_name)
    seen = []
    h = g.modules[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).abs().amax(0)))
    with torch.no_grad():
        call_block(block, inputs[0])
    h.remove()
    return block, inputs[0], g, seen[0], _BlockCheck(block, inputs[0])


def _plain_block_w8a8_error(block, inp, g, s):
    """``_BlockCheck.w8a8_error`` written out: a float32 copy with ``s`` folded by hand, the group's weights rounded
    to int8 per output channel and its inputs to int8 per token, the block output's relative change."""
    import copy

    from hfquant.calibration.blocks import call_block

    blk = copy.deepcopy(block).float()
    with torch.no_grad():
        ref = call_block(blk, inp)
    names = {id(m): n for n, m in block.named_modules()}
    linears = [blk.get_submodule(names[id(m)]) for m in g.modules]
    blk.get_submodule(g.norm_name).weight.data /= s
    for lin in linears:
        w = lin.weight.data * s[None, :]
        step = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
        lin.weight.data = torch.clamp(torch.round(w / step), -127, 127) * step

    def per_token(_m, args):
        x = args[0]
        step = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)
        return (torch.clamp(torch.round(x / step), -127, 127) * step, *args[1:])
    hooks = [lin.register_forward_pre_hook(per_token) for lin in linears]
    with torch.no_grad():
        out = call_block(blk, inp)
    for h in hooks:
        h.remove()
    return float((out - ref).norm() / ref.norm())


def test_block_w8a8_error_matches_a_plain_reimplementation_and_restores_the_copy(tiny_models):
    block, inp, g, act, check = _llama_block_check(tiny_models)
    before = {k: v.clone() for k, v in check.block.state_dict().items()}
    w_max = column_absmax([m.weight for m in g.modules])
    for alpha in (0.3, 0.8):
        s = smoothing_scales(act, w_max, alpha)
        assert check.w8a8_error(g, s) == pytest.approx(_plain_block_w8a8_error(block, inp, g, s), rel=1e-4)
    after = check.block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing of the search stays in the copy
    assert len(check.block._forward_pre_hooks) == 0 and all(
        not m._forward_pre_hooks for m in check.block.modules())


def test_block_w8a8_error_of_a_conv1d_group_matches_w8a8_modules(tiny_models):
    """GPT-2's ``Conv1D`` stores ``[in, out]``: the search rounds its weights per output channel like the W8A8 module
    it becomes. Unsmoothed (s = 1), the simulated error equals the block's change with ``c_attn`` swapped for a
    ``QuantLinearW8A8`` run on the exact reference kernel."""
    import copy

    from hfquant.nn.graph import float_weight
    from hfquant.calibration.blocks import call_block
    from hfquant.kernels import reference_kernels

    block, inp, g, act, check = _llama_block_check(tiny_models, arch="gpt2", norm_name="ln_1")
    assert [type(m).__name__ for m in g.modules] == ["Conv1D"]
    simulated = check.w8a8_error(g, torch.ones_like(act))
    blk = copy.deepcopy(block).float()
    with torch.no_grad():
        ref = call_block(blk, inp)
        blk.attn.c_attn = QuantLinearW8A8.from_float(blk.attn.c_attn, float_weight(blk.attn.c_attn).float())
        with reference_kernels():
            out = call_block(blk, inp)
    assert simulated == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-3)
    assert simulated > 0


def test_searched_alpha_beats_no_smoothing_on_an_outlier_channel(tiny_models):
    """One input channel of q/k/v 50x the others: the alpha the search picks changes the block output far less
    under W8A8 than no smoothing (s = 1) does, and it is the grid's argmin of the block error."""
    from hfquant.calibration.distributed import Dist
    from hfquant.quantize.w8a8 import _search_alpha

    block, inp, g, act, check = _llama_block_check(tiny_models, outlier_channel=5)
    w_max = column_absmax([m.weight.detach().float() for m in g.modules])
    chosen = _search_alpha(check, g, act, w_max, Dist(), torch.device("cpu"))
    errors = {a: check.w8a8_error(g, smoothing_scales(act, w_max, a)) for a in ALPHA_GRID}
    assert chosen in ALPHA_GRID and errors[chosen] == min(errors.values())
    assert errors[chosen] < check.w8a8_error(g, torch.ones_like(act)) / 3


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
    from helpers import use_build

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
    from helpers import use_build

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


def _w8a8_case(in_f: int, out_f: int, x_shape: tuple):
    """(a W8A8 module from a seeded random Linear, an input, the exact reference output)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f)
    m = QuantLinearW8A8.from_float(lin, lin.weight.data)
    x = torch.randn(*x_shape) * 3
    return m, x, w8a8_reference(x, m)


@pytest.mark.parametrize("mode", ["int", "tiles", "reproducible", "fastest"])
def test_many_rows_without_vnni_match_the_reference(mode, monkeypatch):
    """Without AVX512-VNNI, W8A8 with several rows runs hfquant's int8 GEMM (bit-identical to the reference) or the
    float32 tiles (float32 sums), as ``HFQUANT_CPU_W8A8`` says; by default the machine's recorded choice."""
    import hfquant.kernels.w8a8 as k
    monkeypatch.setenv("HFQUANT_CPU_W8A8", mode)
    monkeypatch.setattr(k, "_MANY_ROWS_CHOICE", {})
    with running_as("avx2", monkeypatch):
        m, x, ref = _w8a8_case(600, 70, (3, 11, 600))
        y = k.w8a8_linear(x, m)
        if mode == "int" and k._int_gemm_kernel() is not None:
            assert torch.equal(y, ref)
        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-6
        assert len(k._MANY_ROWS_CHOICE) == int(mode in ("reproducible", "fastest"))
        monkeypatch.setenv("HFQUANT_CPU_W8A8", "fast")
        with pytest.raises(ValueError, match="HFQUANT_CPU_W8A8"):
            k.w8a8_linear(x, m)


@pytest.mark.parametrize("isa,int_mm", [("avx2", False), ("avx512", False), ("avx512-vnni", True)])
def test_many_rows_use_int_mm_only_where_it_is_fast(isa, int_mm, monkeypatch):
    """Without AVX512-VNNI torch's ``_int_mm`` is a plain loop (two orders of magnitude slower than float32), so
    W8A8 prefill runs hfquant's int8 GEMM or float32 tiles there; all match the exact reference."""
    import hfquant.kernels.w8a8 as k

    with running_as(isa, monkeypatch):
        calls = []
        real = torch._int_mm
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
        m, x, ref = _w8a8_case(576, 200, (2, 37, 576))
        y = k.w8a8_linear(x, m)
        assert bool(calls) == int_mm
        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-6
        tiles = k.w8a8_float_tiles(x, m, tile=48)  # several tiles, a partial last one
        assert ((tiles - ref).abs().max() / ref.abs().max()) < 1e-6


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
    from hfquant.quantize.smoothing import missing_known_groups

    found = [("input_layernorm", ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")),
             ("post_attention_layernorm", ("mlp.up_proj", "mlp.gate_proj"))]
    assert missing_known_groups("llama", found) == []
    assert missing_known_groups("qwen2", found[:1]) == ["post_attention_layernorm -> mlp.gate_proj, mlp.up_proj"]
    assert missing_known_groups("unknown-family", []) == []
