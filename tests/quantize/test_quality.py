"""Issue 20: accuracy beyond GPTQ. The Hessian-weighted grid search (``observer="hessian"``), asymmetric
calibration (GPTAQ, ``gptaq``) and the ``quality`` setting that chooses them."""

from __future__ import annotations

import pytest
import torch

from hfquant.config import HFQuantConfig
from hfquant.core.errors import ConfigError
from helpers import solve_kw as gptq_solve

from hfquant.core.gptq import asymmetric_target, prepare_hessian
from hfquant.core.grids import (
    ASYM_COARSE, ASYM_FINE_STEP, MIN_SHRINK, SYM_COARSE, SYM_FINE, SYM_FINE_STEP, dequantize, fit_grid,
    quantize_codes, search_grid, stored_scale,
)


def _weighted_error(w, imp, scale, zero, maxq):
    q = quantize_codes(w, scale[:, None], zero[:, None], maxq)
    return ((dequantize(q, scale[:, None], zero[:, None]) - w) ** 2 * imp).sum(dim=1)


def _search_by_hand(row: torch.Tensor, imp: torch.Tensor, bits: int, sym: bool) -> float:
    """The coarse-to-fine search written out for one row with Python floats (float64): the smallest weighted
    error it can reach."""
    maxq = 2**bits - 1

    def err(s, z):
        return float(_weighted_error(row[None].double(), imp.double(), torch.tensor([s], dtype=torch.float64),
                                     torch.tensor([float(z)], dtype=torch.float64), maxq))
    if sym:
        half = (maxq + 1) // 2
        m = float(row[row.abs().argmax()])
        units = [-m / half, m / (half - 1)]
        coarse = [(u, p) for u in units for p in SYM_COARSE]
        best_e, best = min((err(u * p, half), (u, p)) for u, p in coarse)
        ref = err(2 * abs(m) / maxq, half)
        if ref < best_e:
            return ref
        u, p = best
        fine = [min(max(p + d * SYM_FINE_STEP, MIN_SHRINK), 1.0) for d in range(-SYM_FINE, SYM_FINE + 1) if d]
        return min([best_e] + [err(u * q, half) for q in fine])
    lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)

    def grid(a, b):
        s = (hi * b - lo * a) / maxq
        return err(s, min(max(round(-lo * a / s), 0), maxq))
    best_e, (a, b) = min((grid(a, b), (a, b)) for a in ASYM_COARSE for b in ASYM_COARSE)
    steps = [(da, db) for da in (-1, 0, 1) for db in (-1, 0, 1) if da or db]
    fine = [grid(min(max(a + da * ASYM_FINE_STEP, MIN_SHRINK), 1.0), min(max(b + db * ASYM_FINE_STEP, MIN_SHRINK), 1.0))
            for da, db in steps]
    return min([best_e] + fine)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, False), (3, True), (2, False)])
def test_hessian_search_matches_a_search_by_hand(bits, sym):
    """The chosen grid's weighted error equals that of the same coarse-to-fine search written out by hand."""
    torch.manual_seed(bits * 2 + sym)
    w = torch.randn(12, 40) * torch.rand(12, 1)
    w[3, 7] = 9.0  # an outlier on the positive side: the signed grid should turn to face it
    imp = torch.rand(40) ** 3
    imp[5] = 0.0
    g = search_grid(w, bits, sym, imp)
    got = _weighted_error(w.double(), imp.double(), g.scale.double(), g.zero.double(), g.maxq)
    for r in range(w.shape[0]):
        assert got[r] == pytest.approx(_search_by_hand(w[r], imp, bits, sym), rel=1e-5, abs=1e-9)
    assert g.scale[3] < 0 if sym else True


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, True), (3, False), (2, False), (8, True)])
def test_hessian_search_never_loses_to_the_reference_grid(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(64, 128) * torch.logspace(-2, 0, 64)[:, None]
    imp = torch.rand(128) * 10
    ref = fit_grid(w, bits, sym, "minmax")
    new = fit_grid(w, bits, sym, "hessian", importance=imp)
    e_ref = _weighted_error(w, imp, ref.scale, ref.zero, ref.maxq)
    e_new = _weighted_error(w, imp, new.scale, new.zero, new.maxq)
    assert (e_new <= e_ref * (1 + 1e-6)).all()
    assert e_new.sum() < 0.9 * e_ref.sum()  # and it is a real gain, not a tie


def test_signed_grid_puts_the_largest_weight_on_the_longer_half():
    """4-bit symmetric codes span [-8, 7] * scale: a row whose largest weight is positive gets a negative scale
    (code 0 then holds +8 |scale|), and that weight lands on code 0, within one step of its value."""
    w = torch.tensor([[0.1, -0.3, 0.8, 0.25, -0.05, 0.4, -0.6, 0.0]])
    g = search_grid(w, 4, True, torch.ones(8))
    assert g.scale.item() < 0
    q = quantize_codes(w, g.scale[:, None], g.zero[:, None], 15)
    assert q[0, 2].item() == 0
    assert abs(dequantize(q, g.scale[:, None], g.zero[:, None])[0, 2].item() - 0.8) < abs(g.scale.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_scale_keeps_the_sign(dtype):
    s = torch.tensor([-0.013, 0.013, -1e-30, 1e-30])
    out = stored_scale(s, dtype)
    assert (out[:2] == s[:2].to(dtype).float()).all()
    tiny = torch.finfo(dtype).tiny
    assert out[2].item() == pytest.approx(-tiny) and out[3].item() == pytest.approx(tiny)


def _layer_data(n=512, cols=48, rows=24, shift=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    # The same tokens in the float model: a drift correlated with x (as the error of quantized layers before
    # is), plus a little independent noise.
    drift = torch.randn(cols, cols, generator=g) / cols**0.5
    xf = x + shift * x @ drift + 0.05 * torch.randn(n, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    h = 2 / n * x.t() @ x
    c = 2 / n * (xf - x).t() @ x
    return x, xf, w, h, c


@pytest.mark.parametrize("act_order", [False, True])
def test_asymmetric_target_is_the_least_squares_optimum(act_order):
    """W' = W + W C H^-1 minimizes ||X W'^T - X_float W^T||: compare with torch's least squares (no damping)."""
    x, xf, w, h, c = _layer_data()
    factor = prepare_hessian(h, act_order=act_order, damp_percent=0.0)
    got = asymmetric_target(w, c, factor, alpha=1.0)
    want = torch.linalg.lstsq(x.double(), (xf.double() @ w.double().t())).solution.t()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3)  # float32 factor of H^-1

    def objective(v):
        return float((x.double() @ v.double().t() - xf.double() @ w.double().t()).pow(2).sum())
    assert objective(got) == pytest.approx(objective(want), rel=1e-5)
    assert objective(got) < objective(w)
    half = asymmetric_target(w, c, factor, alpha=0.5)
    torch.testing.assert_close(half, (w + got) / 2, rtol=1e-5, atol=1e-5)


def test_zero_cross_term_is_plain_gptq_bit_for_bit():
    _, _, w, h, _ = _layer_data()
    factor = prepare_hessian(h, act_order=True)
    kw = dict(bits=4, group_size=16, sym=False, static_groups=True)
    a = gptq_solve(w, factor, **kw)
    b = gptq_solve(w, factor, **kw, cross=torch.zeros(48, 48), cross_alpha=0.25)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptaq_matches_the_float_outputs_better_than_gptq(bits):
    """On inputs that drifted from the float model's (as after quantized layers), GPTQ on the asymmetric target
    gets closer to the float layer's outputs on the float inputs than plain GPTQ does."""
    x, xf, w, h, c = _layer_data(shift=0.5)
    factor = prepare_hessian(h, act_order=True)
    kw = dict(bits=bits, group_size=16, sym=False, static_groups=True)
    plain = gptq_solve(w, factor, **kw).dequantized()
    asym = gptq_solve(w, factor, **kw, cross=c, cross_alpha=1.0).dequantized()
    target = xf @ w.t()
    assert (x @ asym.t() - target).pow(2).mean() < 0.9 * (x @ plain.t() - target).pow(2).mean()


def test_quality_sets_only_what_is_not_given():
    assert HFQuantConfig().observer == "hessian" and HFQuantConfig().gptaq is False
    best = HFQuantConfig(quality="best")
    assert best.observer == "hessian" and best.gptaq is True and best.reconstruct_steps == 16
    assert HFQuantConfig(quality="best", observer="minmax", gptaq=False).to_dict()["observer"] == "minmax"
    assert HFQuantConfig(quality="best", gptaq=False).gptaq is False
    rtn = HFQuantConfig(method="rtn", quality="best")  # asymmetric calibration and reconstruction need data
    assert rtn.gptaq is False and rtn.reconstruct_steps == 0 and rtn.observer == "hessian"
    gguf = HFQuantConfig(gguf_type="Q4_0", quality="best")  # GGUF's own grid fits
    assert gguf.observer == "minmax" and gguf.gptaq is True and gguf.reconstruct_steps == 0
    assert HFQuantConfig.from_dict(best.to_dict()) == best


@pytest.mark.parametrize("kwargs,message", [
    (dict(quality="max"), "quality: got 'max'; expected one of ['default', 'best']"),
    (dict(method="smoothquant", quality="best"), 'quality: got \'best\'; expected "default" for method smoothquant'),
    (dict(method="rtn", gptaq=True), "gptaq: got True; expected false for method 'rtn'"),
    (dict(gptaq_alpha=0), "gptaq_alpha: got 0; expected a number in (0, 1]"),
])
def test_quality_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_recipe_takes_quality(tmp_path):
    from hfquant.app.recipe import validate

    from hfquant.app.recipe import to_config

    recipe = validate({"model": "m", "output_dir": str(tmp_path), "quantization": {"method": "gptq", "quality": "best"}})
    q = recipe["quantization"]  # the resolved recipe shows what quality chose, and the config gets it
    assert (q["quality"], q["observer"], q["gptaq"], q["reconstruct_steps"]) == ("best", "hessian", True, 16)
    assert to_config(recipe) == HFQuantConfig(quality="best")
    mine = validate({"model": "m", "output_dir": str(tmp_path),
                     "quantization": {"method": "gptq", "quality": "best", "reconstruct_steps": 0}})
    assert to_config(mine).reconstruct_steps == 0 and to_config(mine).gptaq is True
    gguf = validate({"model": "m", "output_dir": str(tmp_path), "quantization": {"method": "gptq", "gguf_type": "Q4_0"}})
    assert gguf["quantization"]["observer"] == "minmax"


def test_reconstruction_starts_exactly_at_gptq():
    """With no offset and unit scale factors, the reconstruction's stored codes, scales and weight are GPTQ's."""
    from hfquant.quantize.reconstruct import RoundedWeight

    _, _, w, h, _ = _layer_data()
    for sym in (True, False):
        res = gptq_solve(w, prepare_hessian(h, act_order=True), bits=3, group_size=16, sym=sym, static_groups=True,
                         observer="hessian", scale_dtype=torch.bfloat16)
        g = res.g_idx.long()
        unit = RoundedWeight("m", res.pre / res.scales[:, g], res.zeros.float()[:, g], res.scales, g, 7,
                             torch.float32, torch.bfloat16)
        codes, scales, weight = unit.stored(torch.zeros_like(w), torch.ones_like(res.scales))
        assert torch.equal(codes, res.codes) and torch.equal(scales, res.scales)
        assert torch.equal(weight, res.dequantized())


def test_reconstruction_lowers_block_error_and_reloads(tiny_models, tmp_path):
    """GPTQ then block reconstruction on a tiny Llama: every block reports a lower output error, and the saved
    checkpoint reloads to the same logits as the model in memory."""
    from transformers import AutoModelForCausalLM

    from helpers import small_calibration, tiny_tokenizer

    cfg = HFQuantConfig(bits=3, group_size=32, reconstruct_steps=32, tokenizer=tiny_tokenizer(),
                        **small_calibration(num_samples=16))
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)
    notes = [m["note"] for m in model.hfquant_report["modules"] if m["method"] == "gptq"]
    assert notes and all(n.startswith("block reconstruction: output error x0.") for n in notes)
    ids = torch.randint(0, 320, (1, 32))
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="rtn", reconstruct_steps=4), "reconstruct_steps: got 4; expected 0 for method 'rtn'"),
    (dict(gguf_type="Q4_0", reconstruct_steps=4), "reconstruct_steps: got 4; expected 0 with gguf_type"),
    (dict(reconstruct_steps=-1), "reconstruct_steps: got -1; expected a number of steps >= 0"),
])
def test_reconstruction_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_best_quality_with_reconstruction_in_low_precision(tiny_models, tmp_path, dtype):
    """quality best plus reconstruction on a bf16/fp16 model: scales stored in the model's dtype, the saved
    checkpoint reloads to the in-memory logits, and the result is closer to the float model than plain GPTQ."""
    from transformers import AutoModelForCausalLM

    from helpers import small_calibration, tiny_tokenizer

    ids = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=dtype)(ids).logits.float()

    def run(**kw):
        cfg = HFQuantConfig(bits=3, group_size=32, tokenizer=tiny_tokenizer(), **small_calibration(num_samples=16), **kw)
        return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=dtype, quantization_config=cfg)

    plain = run(observer="minmax")
    best = run(quality="best", reconstruct_steps=32)
    assert {v.dtype for k, v in best.state_dict().items() if k.endswith(".scales")} == {dtype}
    best.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=dtype)
    with torch.no_grad():
        out = best(ids).logits.float()
        torch.testing.assert_close(again(ids).logits.float(), out, rtol=0, atol=0)
        assert (out - ref).pow(2).mean() < (plain(ids).logits.float() - ref).pow(2).mean()


def test_best_quality_on_gemma3(tiny_models, tmp_path):
    """The second architecture (Gemma 3: sliding and full attention layers, q/k norms, norms after the attention
    and the MLP): quality best runs every module through GPTQ, reconstruction lowers at least one block's output
    error, the checkpoint reloads to the in-memory logits, and the result is closer to the float model than
    plain GPTQ on the reference grid."""
    from transformers import AutoModelForCausalLM

    from helpers import small_calibration, tiny_tokenizer

    ids = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"])(ids).logits

    def run(**kw):
        cfg = HFQuantConfig(bits=3, group_size=32, tokenizer=tiny_tokenizer(), **small_calibration(num_samples=16), **kw)
        return AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"], quantization_config=cfg)

    plain = run(observer="minmax")
    best = run(quality="best", reconstruct_steps=32)
    modules = best.hfquant_report["modules"]
    assert len(modules) == 14 and {m["method"] for m in modules} == {"gptq"}
    assert any(m["note"].startswith("block reconstruction: output error x0.") for m in modules)
    best.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        out = best(ids).logits
        torch.testing.assert_close(again(ids).logits, out, rtol=0, atol=0)
        assert (out - ref).pow(2).mean() < (plain(ids).logits - ref).pow(2).mean()
