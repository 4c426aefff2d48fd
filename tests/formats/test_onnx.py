"""ONNX Runtime export (``hfquant export --format onnx``, ``save_format: onnx``): a tiny Llama's quantized Linears
become MatMulNBits with the checkpoint's bits and group size, and ``onnxruntime`` gives the hfquant model's logits
(1e-3 relative) on a prompt, step by step through the KV cache, and in onnxruntime-genai's greedy generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from helpers import small_calibration, tiny_tokenizer
from hfquant import HFQuantConfig

from hfquant.core.errors import ConfigError, FormatError
from hfquant.formats.export import export_checkpoint
from hfquant.formats.onnx import check_onnx_exportable, check_onnx_graph, ONNX_FILE
from hfquant.formats.onnx_rewrite import NBits

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime_genai")

REL = 1e-3
PROMPT = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))


def _quantize(float_dir: Path, out: Path, **kw):
    grid = {} if kw.get("method") == "smoothquant" or "group_size" in kw else {"group_size": 32}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=HFQuantConfig(**grid, **{**small_calibration(), **kw}))
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return model


def _feeds(session, ids: np.ndarray, past: dict | None, config) -> dict:
    n_past = 0 if past is None else next(iter(past.values())).shape[2]
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, n_past + ids.shape[1]), np.int64)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            empty = np.zeros((1, config.num_key_value_heads, 0, config.head_dim), np.float32)
            feeds[inp.name] = empty if past is None else past[inp.name]
    return feeds


def _run(session, ids: np.ndarray, past, config):
    """Logits of ``ids`` after ``past`` (None: an empty cache) and the cache to pass on."""
    outs = session.run(None, _feeds(session, ids, past, config))
    names = [o.name for o in session.get_outputs()]
    cache = {n.replace("present", "past_key_values"): v for n, v in zip(names, outs) if n.startswith("present")}
    return outs[names.index("logits")][0], cache


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """GPTQ W4 g32 (act-order, static groups: the defaults) of the tiny Llama, its logits and its ONNX export."""
    root = tmp_path_factory.mktemp("onnx")
    model = _quantize(tiny_models["llama"], root / "hfquant")
    with torch.no_grad():
        ref = model(PROMPT).logits[0].numpy()
    out = export_checkpoint(root / "hfquant", "onnx", root / "onnx")
    return model, ref, out


def test_prompt_logits_match_the_hfquant_model(exported):
    model, ref, out = exported
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    logits, _ = _run(session, PROMPT.numpy(), None, model.config)
    assert _rel(logits, ref) < REL


def test_every_quantized_linear_is_matmulnbits_with_the_checkpoints_grid(exported):
    model, _, out = exported
    graph = onnx.load(str(out / ONNX_FILE), load_external_data=False).graph
    nbits = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in graph.node if n.op_type == "MatMulNBits"]
    # per layer: q/k/v fused into one node, o, gate, up, down (the builder fuses q/k/v only on this family)
    assert len(nbits) == 5 * model.config.num_hidden_layers
    assert all(a["bits"] == 4 and a["block_size"] == 32 and a["accuracy_level"] == 1 for a in nbits)
    assert check_onnx_graph(out / ONNX_FILE, 7 * model.config.num_hidden_layers)["MatMul"] == 1  # the head only
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_decode_through_the_kv_cache_matches_the_full_sequence(exported):
    model, ref, out = exported
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    ids = PROMPT.numpy()
    logits, past = _run(session, ids[:, :32], None, model.config)
    assert _rel(logits, ref[:32]) < REL
    for t in range(32, ids.shape[1]):
        step, past = _run(session, ids[:, t:t + 1], past, model.config)
        assert _rel(step[-1], ref[t]) < REL, t


def test_onnxruntime_genai_greedy_generation_equals_transformers(exported):
    import onnxruntime_genai as og

    model, _, out = exported
    prompt = PROMPT[0, :8].tolist()
    runtime = og.Model(str(out))
    params = og.GeneratorParams(runtime)
    params.set_search_options(do_sample=False, max_length=24)
    gen = og.Generator(runtime, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    expected = model.generate(torch.tensor([prompt]), max_length=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert tokens == expected


@pytest.mark.parametrize("kw, attribute, values", [
    ({"sym": False}, "bits", {4}),
    ({"bits": 8}, "bits", {8}),
    # 64 and 160 inputs in groups of 48, the last one partial (64 = 48 + 16, 160 = 3 x 48 + 16): blocks of 16
    ({"group_size": 48, "sym": False}, "block_size", {16}),
    # one group per row: blocks of 128, each with the row's scale
    ({"group_size": -1, "sym": False}, "block_size", {128}),
], ids=["asym4", "int8", "partial-g48", "per-channel"])
def test_asymmetric_8_bit_and_any_static_group_size(tiny_models, tmp_path, kw, attribute, values):
    """MatMulNBits blocks are the largest power of two (16..128) dividing the group, each with its group's scale
    and zero point: any static group size exports with the hfquant model's logits."""
    model = _quantize(tiny_models["llama"], tmp_path / "hfquant", method="rtn", **kw)
    with torch.no_grad():
        ref = model(PROMPT).logits[0].numpy()
    out = export_checkpoint(tmp_path / "hfquant", "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert _rel(_run(session, PROMPT.numpy(), None, model.config)[0], ref) < REL
    graph = onnx.load(str(out / ONNX_FILE), load_external_data=False).graph
    assert {onnx.helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == attribute} == values


def test_save_format_onnx_writes_a_runnable_model(tiny_models, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], quantization_config=HFQuantConfig(method="rtn", group_size=32, save_format="onnx"))
    with torch.no_grad():
        ref = model(PROMPT).logits[0].numpy()
    model.save_pretrained(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))
    session = ort.InferenceSession(str(tmp_path / "out" / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert _rel(_run(session, PROMPT.numpy(), None, model.config)[0], ref) < REL


def test_w8a8_runs_per_token_int8_activations_and_int8_weights(tiny_models, tmp_path):
    model = _quantize(tiny_models["llama"], tmp_path / "hfquant", method="smoothquant")
    with torch.no_grad():
        ref = model(PROMPT).logits[0].numpy()
    out = export_checkpoint(tmp_path / "hfquant", "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert _rel(_run(session, PROMPT.numpy(), None, model.config)[0], ref) < 1e-5  # the same arithmetic
    ops = check_onnx_graph(out / ONNX_FILE, 7 * model.config.num_hidden_layers)
    assert ops["MatMulInteger"] == 5 * model.config.num_hidden_layers and ops["MatMul"] == 1


def test_gguf_grids_and_experts_are_refused_in_one_line(tmp_path):
    with pytest.raises(FormatError) as err:
        check_onnx_exportable(HFQuantConfig(gguf_type="Q4_0"), tmp_path, has_experts=False)
    assert "\n" not in str(err.value) and "gguf" in str(err.value)
    with pytest.raises(FormatError, match="Mixture-of-Experts"):
        check_onnx_exportable(HFQuantConfig(), tmp_path, has_experts=True)
    with pytest.raises(ConfigError, match="save_format"):
        HFQuantConfig(gguf_type="Q4_0", save_format="onnx")


@pytest.mark.parametrize("kw, match", [(dict(bits=3), "3-bit codes"),
                                       (dict(method="gptq", desc_act=True, static_groups=False), "static_groups")])
def test_what_matmulnbits_cannot_hold_is_refused_before_anything_is_written(tiny_models, tmp_path, kw, match):
    _quantize(tiny_models["llama"], tmp_path / "hfquant", **{"method": "rtn", **kw})
    with pytest.raises(FormatError, match=match) as err:
        export_checkpoint(tmp_path / "hfquant", "onnx", tmp_path / "onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("bits, k, group, sym", [(4, 80, 48, False), (4, 96, 32, False), (8, 80, 48, False),
                                                 (4, 200, 200, False), (4, 80, 48, True), (8, 96, 32, True)])
def test_matmulnbits_node_computes_x_times_the_dequantized_weight(bits, k, group, sym):
    """One MatMulNBits node from ``NBits`` (random codes, asymmetric zero points or symmetric ones, which are left to
    the kernel's default ``2**(bits-1)``; partial last group, odd block counts) run by onnxruntime equals ``x @ W.T``
    with W the de-quantized codes: the packing of codes, scales and zero points is what the kernel reads."""
    g = torch.Generator().manual_seed(bits + k + group)
    n, groups = 24, -(-k // group)
    zeros = (torch.full((n, groups), 2 ** (bits - 1), dtype=torch.uint8) if sym
             else torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8))
    w = NBits(torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8), torch.rand(n, groups, generator=g) + 0.1,
              zeros, group, bits)
    h = onnx.helper
    node = h.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")
    nodes, inits = w.nodes(h, onnx.numpy_helper, node, "/model/layers.0/mlp/down_proj", 21, 1)
    assert len(nodes[0].input) == (3 if sym else 4)
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, k])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, n])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    x = torch.randn(3, k, generator=g)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert _rel(y, (x @ w.weight().t()).numpy()) < 1e-5


def test_a_group_size_without_a_power_of_two_block_is_refused():
    w = NBits(torch.zeros(8, 144, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.uint8), 72, 4)
    with pytest.raises(FormatError, match="multiple of 16"):
        w.block()


def test_a_float_weight_matmul_in_the_graph_is_an_error(tmp_path):
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    node = h.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(h.make_model(graph), str(tmp_path / ONNX_FILE))
    with pytest.raises(FormatError, match="float MatMul weights"):
        check_onnx_graph(tmp_path / ONNX_FILE, 7)
