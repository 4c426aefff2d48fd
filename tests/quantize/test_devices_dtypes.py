"""Real checkpoints: bf16/fp16 models, and every tensor hfquant creates following its inputs' device.

The device test quantizes a tiny model whose weights are on the CPU inside ``with torch.device("meta")``: an
allocation without ``device=`` then lands on ``meta`` and the run fails ("Cannot copy out of meta tensor"),
so a passing run shows that every tensor follows its inputs -- the property a CUDA run needs -- and the
result must equal a normal run bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from helpers import small_calibration, tiny_config, tiny_tokenizer

METHODS = {
    "rtn": dict(method="rtn", group_size=32),
    "gptq": dict(method="gptq", group_size=32),
    "gptq-asym-noact": dict(method="gptq", group_size=32, sym=False, desc_act=False, true_sequential=False),
    "gptq-mixed": dict(method="gptq", group_size=32, overrides={"*.mlp.down_proj": {"bits": 8},
                                                                 "*.v_proj": {"method": "rtn"}}),
    "gptq-head8": dict(method="gptq", group_size=32, lm_head_bits=8),
    "gptq-auto": dict(method="gptq", group_size=32, bits="auto", target_avg_bits=4.0, fisher_windows=2),
    "smoothquant": dict(method="smoothquant"),
    "smoothquant-gptq-static": dict(method="smoothquant", alpha=0.5, weight_method="gptq", activation_scheme="static"),
    "smoothquant-plain": dict(method="smoothquant", alpha=None),
    "gguf-gptq-q4_k_m": dict(method="gptq", gguf_type="Q4_K_M"),
    "gguf-rtn-q4_1": dict(method="rtn", gguf_type="Q4_1"),
}


def _model(arch: str = "llama", dtype=torch.float32, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype).eval()


def _config(**kw):
    from hfquant import HFQuantConfig

    return HFQuantConfig(tokenizer=tiny_tokenizer(), **small_calibration(), **kw)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_allocation_follows_the_input_device(name):
    """Under ``torch.device("meta")`` any tensor created without ``device=`` is a meta tensor and breaks the
    run; the quantized model must equal the one quantized normally, tensor for tensor."""
    import hfquant

    normal = _model()
    hfquant.quantize_(normal, _config(**METHODS[name]), progress=False)
    model = _model()
    with torch.device("meta"):
        hfquant.quantize_(model, _config(**METHODS[name]), progress=False)
    a, b = _state(normal), _state(model)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].device.type == "cpu", k
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_the_meta_device_test_catches_a_stray_allocation(monkeypatch):
    """The property above can fail: an allocation without ``device=`` in the solve breaks the meta run."""
    import hfquant
    import hfquant.core.int_grid as g  # where the GPTQ solve fits its group grids

    real = g.fit_grid

    def stray(w, *a, **kw):
        grid = real(w, *a, **kw)
        grid.scale = grid.scale + torch.zeros(grid.scale.shape[0])  # no device=: meta inside the context
        return grid

    monkeypatch.setattr(g, "fit_grid", stray)
    model = _model()
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"), torch.device("meta"):
        hfquant.quantize_(model, _config(**METHODS["gptq"]), progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["rtn", "gptq", "gptq-asym-noact", "gptq-mixed", "gptq-head8", "gptq-auto"])
def test_low_precision_weights_are_calibrated_on_what_is_saved(dtype, name, monkeypatch):
    """bf16/fp16 models: scales are stored in the model's dtype, and the dequantized weight every later stage
    and block is calibrated on is exactly the saved module's ``dequantize()`` in that dtype."""
    import hfquant
    import hfquant.quantize.weight_only as hq
    from hfquant.nn.weight_only import QuantLinearWeightOnly

    written: dict[int, torch.Tensor] = {}
    real = hq.set_float_weight_

    def record(module, w):
        real(module, w)
        written[id(module)] = module.weight.detach().clone()

    monkeypatch.setattr(hq, "set_float_weight_", record)
    model = _model(dtype=dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    hfquant.quantize_(model, _config(**METHODS[name]), progress=False)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinearWeightOnly)}
    assert quantized, "nothing was quantized"
    calibrated = 0
    for n, q in quantized.items():
        assert q.scales.dtype == dtype, n
        # Never zero (a float16 scale must not flush); symmetric grids may be negative (observer "hessian").
        assert torch.isfinite(q.scales.float()).all() and (q.scales.float() != 0).all(), n
        w = q.dequantize(dtype)
        assert torch.isfinite(w.float()).all(), n
        if id(linears[n]) in written:
            assert torch.equal(written[id(linears[n])], w), n
            calibrated += 1
    if name != "rtn":
        assert calibrated >= len(quantized) - 1  # every block module (the head is RTN after the blocks)
    ids = tiny_tokenizer()("The tower is 324 metres tall.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


def test_rtn_codes_are_optimal_for_the_stored_bf16_scale():
    """Each code is the nearest point of the grid the checkpoint stores (the bf16-rounded scale)."""
    from hfquant.core.grids import quantize_codes, rtn_quantize

    torch.manual_seed(0)
    w = torch.randn(16, 96).bfloat16().float()
    codes, scales, zeros, g_idx = rtn_quantize(w, 4, 32, False, scale_dtype=torch.bfloat16)
    assert torch.equal(scales, scales.bfloat16().float())
    g = g_idx.long()
    expect = quantize_codes(w, scales[:, g], zeros[:, g].float(), 15)
    assert torch.equal(codes, expect.int())
    unrounded = rtn_quantize(w, 4, 32, False)[1]
    assert not torch.equal(unrounded, scales)  # the rounding happened (else the test shows nothing)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_smoothquant_smooths_every_llama_group_in_low_precision(dtype):
    """The fold check compares in float32, so a bf16/fp16 Llama gets both norm -> Linear groups of every block
    smoothed, and the smoothed W8A8 model stays close to its float model."""
    import hfquant

    model = _model(dtype=dtype)
    ids = tiny_tokenizer()("The tower is 324 metres tall, about the same height as an 81-storey building.",
                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = hfquant.quantize_(model, _config(method="smoothquant", alpha=0.5), progress=False)
    smoothed = {(m["name"].rsplit(".", 2)[0], m["smoothed_by"]) for m in report["modules"] if m["smoothed"]}
    assert len(smoothed) == 2 * model.config.num_hidden_layers, smoothed
    with torch.no_grad():
        out = model(ids).logits.float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.1


def test_bf16_gptq_matches_fp32_gptq_in_error():
    """The same tiny model (bf16-representable weights) quantized from bf16 and from fp32: the GPTQ solves'
    Hessian-weighted errors agree module by module (bf16 activations only perturb the Hessians), and the two
    quantized models compute nearly the same logits."""
    import hfquant

    ids = tiny_tokenizer()("The tower is 324 metres tall, about the same height as an 81-storey building.",
                           return_tensors="pt")["input_ids"]
    losses, logits = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        m = _model().to(torch.bfloat16).to(dtype)  # the same weights in both
        report = hfquant.quantize_(m, _config(**METHODS["gptq"]), progress=False)
        losses[dtype] = {r["name"]: r["loss"] for r in report["modules"] if r["method"] == "gptq"}
        with torch.no_grad():
            logits[dtype] = m(ids).logits.float()
    assert losses[torch.float32].keys() == losses[torch.bfloat16].keys() and losses[torch.float32]
    for n, loss in losses[torch.float32].items():
        assert abs(losses[torch.bfloat16][n] - loss) <= 0.15 * loss, (n, loss, losses[torch.bfloat16][n])
    a, b = logits[torch.float32], logits[torch.bfloat16]
    assert (a - b).norm() / a.norm() < 0.1  # measured 0.052; bf16 arithmetic alone differs by a few percent here


@pytest.mark.parametrize("dtype,method", [("bfloat16", "gptq"), ("float16", "smoothquant"), ("float16", "rtn")])
def test_recipe_dtype_runs_saves_and_reloads(tiny_models, tmp_path, capsys, dtype, method):
    """``dtype: bfloat16`` / ``float16`` in a recipe: the run quantizes in that dtype, the checkpoint keeps it,
    and the reloaded model computes the perplexity the run reported, exactly."""
    import json

    import yaml
    from helpers import recipe_perplexity, run_cli, write_recipe
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], out, dtype=dtype, quantization={"method": method})
    if method == "smoothquant":  # write_recipe's default section has a group_size, which SmoothQuant does not take
        data = yaml.safe_load(recipe.read_text())
        del data["quantization"]["group_size"]
        recipe.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["--quiet", "run", recipe], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == dtype
    if method == "smoothquant":
        assert sum(m["smoothed"] for m in report["layers"]) == 5 * 2  # q, k, v, gate, up in both blocks
    tensors = load_file(out / "model.safetensors")
    floats = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(("weight_scale", "input_scale"))}
    assert floats == {getattr(torch, dtype)}, floats
    model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
    assert recipe_perplexity(model) == pytest.approx(report["evaluation"]["after"], rel=1e-6)


def test_missing_triton_is_one_warning_and_a_fallback(monkeypatch):
    """Without Triton, the CUDA dispatch gets ``None`` (and uses the reference) after one clear warning."""
    import sys
    import warnings

    import hfquant.kernels
    import hfquant.kernels.common as w

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "hfquant.kernels.triton_kernels", raising=False)
    monkeypatch.delattr(hfquant.kernels, "triton_kernels", raising=False)  # an earlier import's attribute
    monkeypatch.setattr(w, "_NO_TRITON_WARNED", False)
    with pytest.warns(UserWarning, match="Triton is not installed.*pip install triton"):
        assert w.triton_kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert w.triton_kernels() is None  # warned once only


def test_out_of_memory_mid_block_is_one_line_and_resumable(tiny_models, tmp_path, capsys, monkeypatch):
    """A device that runs out of memory in the middle of block 1: exit 1 with one line that names what to
    change, no output folder, block 0 kept for ``--resume``, which then finishes the run."""
    import json

    from helpers import run_cli, write_recipe

    import hfquant.quantize.weight_only as hq

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], out, evaluation={"before": False, "after": False})
    real, calls = hq.gptq_solve, [0]

    def solve_then_fail(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 8:  # the first solve of block 1 (7 modules per block)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(hq, "gptq_solve", solve_then_fail)
    code, _, err = run_cli(["--quiet", "run", recipe], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "out of memory" in lines[0] and "calibration.layerwise" in lines[0] and "batch_size" in lines[0]
    assert not out.exists()
    state = json.loads((tmp_path / ".out.hfquant-progress" / "state.json").read_text())
    assert state["blocks_done"] == 1
    monkeypatch.setattr(hq, "gptq_solve", real)
    code, _, err = run_cli(["--quiet", "run", recipe, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["resumed_from_block"] == 1
