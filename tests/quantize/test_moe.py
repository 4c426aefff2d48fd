"""Mixture-of-Experts models (fused 3-D experts): every expert quantized, nothing float in silence, exact reloads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import small_calibration, tiny_tokenizer
from moe_helpers import MOE_FAMILIES, save_moe_model
from hfquant import HFQuantConfig, quantize_
from hfquant.calibration.data import windows_for
from hfquant.core.errors import ConfigError
from hfquant.nn.experts import find_experts, QuantExperts, RoutedExperts, unfuse_experts_

CAL = small_calibration(num_samples=8, seq_len=32)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: save_moe_model(f, root / f) for f in MOE_FAMILIES}


def _ids():
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))


def _assert_reloads_exactly(model, folder) -> None:
    """``save_pretrained`` then ``from_pretrained`` gives the same logits, bit for bit."""
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, logits)


def _expert_weights(model) -> int:
    return sum(p.numel() for m in find_experts(model).values() for n, p in m.named_parameters(recurse=False)
               if p.dim() == 3)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_is_quantized_and_reloads_exactly(family, moe_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_models[family])
    expert_weights = _expert_weights(model)
    assert expert_weights > 0
    report = quantize_(model, HFQuantConfig(bits=4, group_size=16, **CAL), progress=False)
    w = report["weights"]
    assert w["expert_weights_quantized"] == expert_weights  # 100% of the expert weights
    assert not find_experts(model)  # no fused float tensor is left
    assert set(w["float_weights"]) == {"embedding", "head", "router", "bias", "modules_to_not_convert"}
    assert w["float_weights"]["router"] > 0 and report["routers"]
    expert_reports = [r for r in report["modules"] if ".experts." in r["name"]]
    assert expert_reports and all(r["method"] == "gptq" for r in expert_reports)
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["bits_per_weight"] == w["bits_per_weight"]
    assert set(report["routers"]) <= set(saved["modules_to_not_convert"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert sum(isinstance(m, QuantExperts) for m in reloaded.modules()) == w["quantized_experts_modules"] > 0
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_quantized_experts_compute_what_their_dequantized_weights_do(moe_models):
    """``QuantExperts`` (kernels on views of the stacked codes) against the float experts holding the de-quantized
    weights, on the same routing."""
    model = AutoModelForCausalLM.from_pretrained(moe_models["gpt_oss"])
    quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=16), progress=False)
    experts = next(m for m in model.modules() if isinstance(m, QuantExperts))
    ref = AutoModelForCausalLM.from_pretrained(moe_models["gpt_oss"])
    ref_experts = ref.model.layers[0].mlp.experts
    with torch.no_grad():
        for proj in experts.layout.projections:
            w = torch.stack([experts.projection(e, proj).dequantize(torch.float32) for e in range(4)])
            getattr(ref_experts, proj).copy_(w.transpose(1, 2))  # gpt-oss stores [experts, in, out]
            getattr(ref_experts, f"{proj}_bias").copy_(getattr(experts, proj).bias)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2], [1, 3], [3, 1]])
    wts = torch.rand(7, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = experts(x, idx, wts), ref_experts(x, idx, wts)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())


def _text_ids():
    """Bundled text windows other than the calibration ones (another sampling seed)."""
    return windows_for(HFQuantConfig(num_samples=16, seq_len=64, seed=7), tiny_tokenizer())


def _output_error(model, ref_logits) -> float:
    with torch.no_grad():
        return float((model(_text_ids()).logits - ref_logits).norm() / ref_logits.norm())


def test_gptq_on_routed_tokens_beats_round_to_nearest(moe_models):
    ref = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"])
    with torch.no_grad():
        ref_logits = ref(_text_ids()).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"])
        quantize_(model, HFQuantConfig(method=method, bits=3, group_size=16, **CAL), progress=False)
        errors[method] = _output_error(model, ref_logits)
    assert errors["gptq"] < errors["rtn"], errors


def _starved(folder, expert: int = 3):
    """The Mixtral model with routers that never choose ``expert``."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    for layer in model.model.layers:
        router = layer.mlp.gate

        def forward(hidden_states, _router=router):
            logits = nn.functional.linear(hidden_states.reshape(-1, _router.hidden_dim), _router.weight)
            logits[:, expert] = float("-inf")
            top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), _router.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), idx
        router.forward = forward
    return model


def test_unrouted_expert_falls_back_with_a_report_line(moe_models):
    model = _starved(moe_models["mixtral"])
    report = quantize_(model, HFQuantConfig(bits=4, group_size=16, **CAL), progress=False)
    notes = {r["name"]: (r["method"], r["note"]) for r in report["modules"]}
    starved = [n for n in notes if ".experts.3." in n]
    assert len(starved) == 4 and all(notes[n][0] == "rtn" and notes[n][1] for n in starved), notes
    assert all(notes[n][0] == "gptq" for n in notes if ".experts.0." in n)
    # every token through every expert: the starved expert gets GPTQ too
    model = _starved(moe_models["mixtral"])
    report = quantize_(model, HFQuantConfig(bits=4, group_size=16, expert_tokens="all", **CAL), progress=False)
    assert all(r["method"] == "gptq" for r in report["modules"] if ".experts." in r["name"])


def test_expert_min_tokens_rounds_thinly_routed_experts(moe_models):
    model = AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"])
    report = quantize_(model, HFQuantConfig(bits=4, group_size=16, expert_min_tokens=10**6, **CAL), progress=False)
    experts = [r for r in report["modules"] if ".experts." in r["name"]]
    assert experts and all(r["method"] == "rtn" and "expert_min_tokens" in r["note"] for r in experts)
    assert all(r["method"] == "gptq" for r in report["modules"] if ".experts." not in r["name"]
               and ".mlp." not in r["name"])


class _Odd(nn.Module):
    """An experts-like module with a 3-D weight in a layout hfquant does not know."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 64, 64) * 0.02)

    def forward(self, x):
        return x + 0 * (x @ self.w[0])


def test_unknown_3d_weight_is_refused_in_one_line(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.model.layers[0].odd = _Odd()
    with pytest.raises(ConfigError) as err:
        quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=16), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "model.layers.0.odd" in msg and "modules_to_not_convert" in msg
    # kept float knowingly: the run goes through and counts it
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.model.layers[0].odd = _Odd()
    report = quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=16,
                                            modules_to_not_convert=["model.layers.0.odd"]), progress=False)
    assert report["weights"]["float_weights"]["modules_to_not_convert"] == 2 * 64 * 64


def test_unknown_2d_float_weight_is_refused(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.model.layers[1].extra = nn.Module()
    model.model.layers[1].extra.table = nn.Parameter(torch.zeros(8, 64))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.extra\.table \[8, 64\]"):
        quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=16), progress=False)


def test_dense_model_reports_its_bits_per_weight(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    report = quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    w = report["weights"]
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules() if n.startswith("model.layers.")
                 and hasattr(m, "in_features"))
    assert w["quantized_weights"] == linear and w["expert_weights_quantized"] == 0
    # 4-bit codes + float32 scales and uint8 zeros per 32 columns + int32 g_idx; the float32 head at 32 bits
    assert 4 < w["bits_per_weight"] < 32


def test_routed_experts_compute_the_model_output():
    """Unfused (one Linear per expert, as calibrated) gives the transformers module's output."""
    import transformers as tf
    from moe_helpers import moe_config

    for family in ("mixtral", "gpt_oss", "deepseek_v3"):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(moe_config(family)).eval()
        ids = _ids()
        with torch.no_grad():
            ref = model(ids).logits
            unfuse_experts_(model, lambda n: True)
            assert any(isinstance(m, RoutedExperts) for m in model.modules())
            got = model(ids).logits
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (family, float((got - ref).abs().max()))


@pytest.mark.parametrize("extra", [dict(quality="best", reconstruct_steps=5), dict(gguf_type="Q4_0"),
                                   dict(method="smoothquant")], ids=["best", "gguf", "smoothquant"])
def test_moe_with_other_methods(extra, moe_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"])
    kw = dict(CAL)
    if extra.get("method") != "smoothquant" and "gguf_type" not in extra:
        kw.update(bits=4, group_size=16)
    report = quantize_(model, HFQuantConfig(**kw, **extra), progress=False)
    assert report["weights"]["expert_weights_quantized"] == 2 * 4 * 3 * 64 * 96
    _assert_reloads_exactly(model, tmp_path / "q")


def test_resume_after_a_crash_gives_the_same_moe(moe_models, tmp_path, monkeypatch):
    """Progress saved per block (the experts' per-expert results among them) resumes to the same tensors."""
    import hfquant.quantize.weight_only as wo
    from hfquant.quantize.resume import ResumeStore

    config = HFQuantConfig(bits=4, group_size=16, **CAL)
    straight = AutoModelForCausalLM.from_pretrained(moe_models["qwen2_moe"])
    quantize_(straight, config, progress=False)

    store = ResumeStore(tmp_path / "progress", key="k")
    store.start(resume=False)
    after_block = wo._GPTQRun.after_block

    def crash_after_first(self, index, name):
        after_block(self, index, name)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(wo._GPTQRun, "after_block", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        quantize_(AutoModelForCausalLM.from_pretrained(moe_models["qwen2_moe"]), config, progress=False, store=store)
    monkeypatch.setattr(wo._GPTQRun, "after_block", after_block)
    store = ResumeStore(tmp_path / "progress", key="k")
    store.start(resume=True)
    resumed = AutoModelForCausalLM.from_pretrained(moe_models["qwen2_moe"])
    report = quantize_(resumed, config, progress=False, store=store)
    assert report["resumed_from_block"] == 1
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(".experts.gate_up_proj." in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_two_processes_quantize_moe_as_one(moe_models, tmp_path):
    """Two gloo processes (each its own calibration batches; an expert's statistics reduced across them) write the
    same tensors as one process."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from helpers import dist_quantize_worker

    kw = dict(method="gptq", bits=4, group_size=16, **small_calibration(num_samples=6, seq_len=32,
                                                                      calibration_batch_size=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dist_quantize_worker(0, 1, 0, str(moe_models["mixtral"]), str(tmp_path / "one.safetensors"), kw)
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(dist_quantize_worker, args=(2, port, str(moe_models["mixtral"]), str(tmp_path / "two.safetensors"), kw),
             nprocs=2)
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and any(".experts.down_proj." in k for k in one)
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


def test_smoothquant_on_an_unrouted_expert(moe_models):
    """W8A8: an expert the router never chooses still gets int8 weights (dynamic activations, nothing to smooth)."""
    model = _starved(moe_models["mixtral"])
    report = quantize_(model, HFQuantConfig(method="smoothquant", **CAL), progress=False)
    assert report["weights"]["expert_weights_quantized"] == 2 * 4 * 3 * 64 * 96
    assert not any(r["smoothed"] for r in report["modules"] if ".experts." in r["name"])


def test_overrides_apply_to_whole_experts_modules(moe_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"])
    with pytest.raises(ConfigError, match="must share one") as err:
        quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=16,
                                       overrides={"*.experts.1.*": {"bits": 8}}), progress=False)
    assert "\n" not in str(err.value)
    model = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"])
    report = quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=16,
                                            overrides={"*.layers.1.mlp.experts.*": {"bits": 8}}), progress=False)
    assert {r["bits"] for r in report["modules"] if ".layers.1.mlp.experts." in r["name"]} == {8}
    _assert_reloads_exactly(model, tmp_path / "q")


def test_saved_moe_checkpoint_passes_and_fails_the_meta_device_check(moe_models, tmp_path):
    """``validate_checkpoint`` builds the architecture on the meta device with the skeletons a reload builds
    (``QuantExperts`` included) and matches every tensor's shape and dtype."""
    from safetensors.torch import load_file, save_file

    from hfquant.formats.files import CheckpointError
    from hfquant.integrations.validate import validate_checkpoint

    model = AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"])
    quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=16), progress=False)
    model.save_pretrained(tmp_path / "q")
    validate_checkpoint(tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj.scales"
    state[key] = state[key][:3]  # one expert fewer
    save_file(state, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.down_proj\.scales"):
        validate_checkpoint(tmp_path / "q")


def test_bits_auto_gives_each_experts_projection_one_scheme(moe_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_models["olmoe"])
    report = quantize_(model, HFQuantConfig(bits="auto", target_avg_bits=4.0, fisher_windows=2, **CAL),
                       progress=False)
    allocation = report["auto"]["allocation"]
    for layer in range(2):
        for proj in ("gate_up_proj", "down_proj"):
            picks = {str(allocation[f"model.layers.{layer}.mlp.experts.{e}.{proj}"]) for e in range(4)}
            assert len(picks) == 1, picks
    assert report["weights"]["expert_weights_quantized"] == _expert_weights(
        AutoModelForCausalLM.from_pretrained(moe_models["olmoe"]))
    _assert_reloads_exactly(model, tmp_path / "q")


@pytest.mark.parametrize("family,method", [("mixtral", "gptq"), ("qwen2_moe", "gptq"), ("gpt_oss", "rtn")])
def test_layerwise_moe_is_bit_identical_to_full_load(family, method, moe_models, tmp_path):
    """Layer-wise: each block's per-expert checkpoint tensors are merged into the fused ones as transformers does
    (its reverse conversion on an index tensor says where each value goes)."""
    from safetensors.torch import load_file

    from hfquant.api import quantize_layerwise

    config = HFQuantConfig(method=method, bits=4, group_size=16, **CAL)
    full = AutoModelForCausalLM.from_pretrained(moe_models[family])
    quantize_(full, config, progress=False)
    lw = quantize_layerwise(moe_models[family], config, progress=False)
    a, b = full.state_dict(), lw.state_dict()
    assert a.keys() == b.keys() and any(".experts.down_proj." in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    full.save_pretrained(tmp_path / "full")
    lw.save_pretrained(tmp_path / "lw")
    fa, fb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "lw" / "model.safetensors")
    assert fa.keys() == fb.keys() and [k for k in fa if not torch.equal(fa[k], fb[k])] == []


def test_a_projection_no_gguf_block_fits_stays_float_in_the_experts_module(moe_models, tmp_path):
    """OLMoE's 48-wide expert rows fit no GGUF block (32 values): ``down_proj`` stays float as llama.cpp keeps such
    tensors, ``gate_up_proj`` is quantized; the experts module saves and reloads exactly."""
    model = AutoModelForCausalLM.from_pretrained(moe_models["olmoe"])
    report = quantize_(model, HFQuantConfig(method="rtn", gguf_type="Q4_0"), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and isinstance(experts.down_proj, nn.Parameter)
    assert report["weights"]["float_weights"]["modules_to_not_convert"] == 2 * 4 * 64 * 48
    _assert_reloads_exactly(model, tmp_path / "q")
