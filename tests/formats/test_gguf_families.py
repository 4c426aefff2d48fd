"""GGUF export of more families: Qwen3, Gemma 3 (text), Phi-3, Llama with Llama 3 RoPE scaling, Granite, and the
MoE families Qwen2-MoE (with its shared expert), Qwen3-MoE and Mixtral.

Each tiny model (fixed seed, norm weights moved off their initial values) is saved, exported as an F32 GGUF file
and read back by transformers' own GGUF loader (``gguf_file=``): the logits equal the HF model's. Where
transformers' loader cannot read a file back, the test says why and reads it with gguf's reader, gguf's name map
and transformers' own q/k un-permutation instead.

What transformers' GGUF loader (5.25, legacy path: ``transformers.integrations.ggml``) reads back decides some
sizes here: it maps no ``attention.key_length`` for ``qwen3`` (so ``head_dim`` is Qwen3Config's default 128), no
expert widths for ``qwen2moe`` / ``qwen3moe`` (so ``moe_intermediate_size`` and
``shared_expert_intermediate_size`` are the config classes' defaults), and no ``query_pre_attn_scalar`` for
``gemma3`` (so Gemma 3 keeps its default 256 = ``head_dim``, as llama.cpp computes it).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from family_helpers import family_config
from helpers import tiny_tokenizer, VOCAB
from moe_helpers import ATTN
from safetensors.torch import load_file, save_file
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from hfquant import HFQuantConfig
from hfquant.core.errors import FormatError
from hfquant.core.gguf_blocks import dequantize_rows, pack_rows
from hfquant.core.gguf_grids import rtn_block_quantize
from hfquant.formats import export_gguf, load_gguf
from hfquant.formats.gguf_experts import expert_type, ExpertTensor, stack_expert_blocks

gguf = pytest.importorskip("gguf")

_SIZES = ATTN
# This file's family names -> the family test's (``family_helpers``), whose GGUF-leg configs these are.
_FAMILY_TEST_NAME = {"qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3", "llama3_rope": "llama3",
                     "granite": "granite", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}


def _config(family: str):
    if family == "mixtral":  # narrower experts than the family test's
        return tf.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **_SIZES)
    if family in _FAMILY_TEST_NAME:
        return family_config(_FAMILY_TEST_NAME[family], gguf_leg=True)
    raise ValueError(family)


def _save(family: str, folder):
    """The tiny model of ``family`` (seed 0, every 1-D weight moved by noise so Gemma's ``w + 1`` and the norms'
    places are tested), saved with the tiny tokenizer."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def _logits(model, seed=1):
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


READ_BACK = [("qwen3", "qwen3"), ("gemma3", "gemma3"), ("phi3", "phi3"), ("qwen2_moe", "qwen2moe"),
             ("qwen3_moe", "qwen3moe")]


@pytest.mark.parametrize("family,arch", READ_BACK)
def test_float_export_reads_back_in_transformers(tmp_path, family, arch):
    model = _save(family, tmp_path / "f")
    path = export_gguf(tmp_path / "f", tmp_path / "g", float_type="F32")
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)
    fields = _fields(path)
    assert fields["general.architecture"] == arch
    if family == "qwen2_moe":
        assert fields["qwen2moe.expert_count"] == 4 and fields["qwen2moe.expert_used_count"] == 2
        assert fields["qwen2moe.expert_feed_forward_length"] == 1408
        assert fields["qwen2moe.expert_shared_feed_forward_length"] == 5632
        shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(str(path)).tensors}
        assert shapes["blk.0.ffn_gate_exps.weight"] == [64, 1408, 4]  # GGUF lists dims innermost first
        assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == [64]


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_quantized_export_reads_back_as_the_quantized_model(tmp_path, family):
    """An hfquant checkpoint on a GGUF grid (RTN Q4_0): transformers' read-back and ``load_gguf`` give the quantized
    model's logits (Gemma 3 within float32 rounding: its norms travel as ``w + 1``)."""
    _save(family, tmp_path / "f")
    model = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "f", quantization_config=HFQuantConfig(gguf_type="Q4_0", method="rtn"))
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    path = export_gguf(tmp_path / "q", tmp_path / "g")
    ref = _logits(model)
    for loaded in (tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name), load_gguf(path)):
        torch.testing.assert_close(_logits(loaded.eval()), ref, atol=1e-5 if family == "gemma3" else 0, rtol=0)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    fused = {"phi3": ("blk.0.attn_qkv.weight", "blk.0.ffn_up.weight")}.get(family, ("blk.0.attn_q.weight",))
    assert all(types[name] == "Q4_0" for name in fused)


def test_gemma3_norms_are_stored_plus_one(tmp_path):
    model = _save("gemma3", tmp_path / "f")
    path = export_gguf(tmp_path / "f", tmp_path / "g", float_type="F32")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(path)).tensors}
    hf = model.state_dict()
    for gguf_name, hf_name in (("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
                               ("blk.0.post_ffw_norm.weight", "model.layers.0.post_feedforward_layernorm.weight"),
                               ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
                               ("output_norm.weight", "model.norm.weight")):
        torch.testing.assert_close(tensors[gguf_name], hf[hf_name] + 1)
    assert "output.weight" not in tensors and _fields(path)["gemma3.attention.sliding_window"] == 8


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    """llama.cpp states Llama 3's RoPE scaling as the ``rope_freqs`` tensor (each frequency's divisor): it equals the
    ratio of the default frequencies to the HF model's own. transformers' GGUF loader reads neither that tensor nor any
    RoPE scaling key for GGUF ``llama`` (its read-back has default RoPE), so the read-back is given the model's config:
    with it, the file's tensors give the HF model's logits."""
    model = _save("llama3_rope", tmp_path / "f")
    path = export_gguf(tmp_path / "f", tmp_path / "g", float_type="F32")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(path)).tensors}
    head_dim = 16
    default = 500000.0 ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    divisors = default / model.model.rotary_emb.inv_freq.double()
    torch.testing.assert_close(tensors["rope_freqs.weight"].double(), divisors, rtol=1e-5, atol=0)
    stored = sorted(tensors["rope_freqs.weight"].tolist())
    assert stored[0] == 1.0 and stored[-1] == 8.0 and 1.0 < stored[1] < 8.0  # high, blended and low frequencies
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     config=tf.AutoConfig.from_pretrained(tmp_path / "f")).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


def _read_without_transformers_loader(path, model) -> dict[str, torch.Tensor]:
    """``model``'s state dict from the GGUF file, for architectures transformers' GGUF loader cannot read: gguf's
    reader and de-quantization, gguf's HF -> GGUF names, transformers' own q/k un-permutation (its
    ``LlamaTensorProcessor``), the experts' gate and up tensors joined back into ``gate_up_proj``."""
    cfg = model.config
    tensors = {t.name: gguf.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    arch = {"granite": gguf.MODEL_ARCH.GRANITE, "mixtral": gguf.MODEL_ARCH.LLAMA}[cfg.model_type]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    processor = LlamaTensorProcessor(config={"num_attention_heads": cfg.num_attention_heads,
                                             "num_key_value_heads": cfg.num_key_value_heads})
    out = {}
    for key in model.state_dict():
        if key.endswith("experts.gate_up_proj"):
            layer = key.split(".")[2]
            parts = [tensors.pop(f"blk.{layer}.ffn_{w}_exps.weight") for w in ("gate", "up")]
            out[key] = torch.cat([torch.from_numpy(p.copy()) for p in parts], dim=1)
            continue
        base, _, suffix = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "weight")
        name = f"{names.get_name(base)}.{suffix}"
        out[key] = torch.from_numpy(processor.process(tensors.pop(name), name).weights.copy())
    assert set(tensors) <= {"rope_freqs.weight"}, sorted(tensors)  # every tensor of the file has a place
    return out


@pytest.mark.parametrize("family,arch", [("granite", "granite"), ("mixtral", "llama")])
def test_export_of_families_transformers_cannot_read_back(tmp_path, family, arch):
    """Not read back by transformers 5.25, whose GGUF loader has no ``granite`` architecture (it raises "not
    supported") and reads GGUF ``llama`` as a dense Llama / Mistral model (Mixtral's expert tensors find no place):
    the file is read with gguf's reader instead. Its tensors give the HF model's logits, and its metadata holds what
    llama.cpp needs (Granite's multipliers, the expert counts)."""
    model = _save(family, tmp_path / "f")
    path = export_gguf(tmp_path / "f", tmp_path / "g", float_type="F32")
    fresh = tf.AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(_read_without_transformers_loader(path, model), strict=True)
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=1e-4, rtol=0)
    fields = _fields(path)
    assert fields["general.architecture"] == arch
    if family == "granite":
        assert fields["granite.embedding_scale"] == 12.0 and fields["granite.logit_scale"] == 8.0
        assert fields["granite.attention.scale"] == 0.0625
        assert fields["granite.residual_scale"] == pytest.approx(0.22)
    else:
        assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2


@pytest.mark.parametrize("float_type", ["F16", "BF16"])
def test_moe_float_types(tmp_path, float_type):
    """F16 / BF16 exports: 2-D and expert tensors in that type, the router and norms in F32 (as llama.cpp keeps
    them); the read-back equals the HF model with those weights rounded to the type."""
    model = _save("qwen3_moe", tmp_path / "f")
    path = export_gguf(tmp_path / "f", tmp_path / "g", float_type=float_type)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.1.ffn_down_exps.weight"] == float_type
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_q_norm.weight"] == "F32"
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}[float_type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("mlp.gate.weight"):
                p.copy_(p.to(dtype).float())
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


def test_fused_float_experts_layout(tmp_path):
    """Float experts saved fused, as transformers 5.x holds them (``experts.gate_up_proj`` ``[E, 2I, H]``,
    ``experts.down_proj``) instead of per expert: the same file contents, the HF model's logits."""
    model = _save("qwen3_moe", tmp_path / "f")
    state = {k: v for k, v in load_file(tmp_path / "f" / "model.safetensors").items() if ".experts." not in k}
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            state[f"model.layers.{i}.mlp.experts.{proj}"] = getattr(layer.mlp.experts, proj).detach().contiguous()
    save_file(state, tmp_path / "f" / "model.safetensors", metadata={"format": "pt"})
    path = export_gguf(tmp_path / "f", tmp_path / "g", float_type="F32")
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


def _quantized_experts_folder(src, dst, model, layout: str) -> None:
    """``src``'s Qwen3-MoE checkpoint with its experts quantized to nearest on GGUF grids (gate/up Q8_0, down Q4_K),
    saved as a quantized experts module saves them: stacked (``<experts>.gate_up_proj.qweight`` ``[E, 2I, row
    bytes]``, hfquant.nn.experts.QuantExperts) or per expert (``<experts>.<e>.gate_proj.qweight``). ``model``'s
    experts become the blocks' de-quantized weights (ggml's arithmetic), the reference the file must reproduce."""
    state = load_file(src / "model.safetensors")
    schemes = {}
    for i, layer in enumerate(model.model.layers):
        experts, fused = f"model.layers.{i}.mlp.experts", layer.mlp.experts
        for proj, kind in (("gate_up_proj", "Q8_0"), ("down_proj", "Q4_K")):
            weight = getattr(fused, proj).detach()
            blocks = pack_rows(kind, *rtn_block_quantize(kind, weight.flatten(0, 1))).view(*weight.shape[:2], -1)
            values = dequantize_rows(kind, blocks.flatten(0, 1), weight.shape[2]).view_as(weight)
            getattr(fused, proj).data.copy_(values)
            if layout == "stacked":
                state[f"{experts}.{proj}.qweight"] = blocks
                schemes.update({f"{experts}.{e}.{proj}": {"gguf_type": kind} for e in range(len(blocks))}
                               if proj == "gate_up_proj" else {f"{experts}.{proj}": {"gguf_type": kind}})
                continue
            halves = blocks.chunk(2, dim=1) if proj == "gate_up_proj" else (blocks,)
            for name, part in zip(("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",), halves):
                for e in range(len(part)):
                    state[f"{experts}.{e}.{name}.qweight"] = part[e].contiguous()
                    schemes[f"{experts}.{e}.{name}"] = {"gguf_type": kind}
        for key in [k for k in state if k.startswith(experts + ".") and k.endswith(".weight")]:
            del state[key]
    dst.mkdir()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hfquant", "gguf_type": "Q8_0", "module_schemes": schemes}
    (dst / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(dst)


@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
def test_quantized_experts_are_the_experts_blocks_stacked(tmp_path, layout):
    """Quantized experts (made here by rounding to nearest, as a quantized experts module would save them): the
    file's 3-D expert tensors are the experts' block rows stacked, byte for byte, in each projection's type, and
    transformers' read-back equals the HF model with the de-quantized experts."""
    model = _save("qwen3_moe", tmp_path / "f")
    _quantized_experts_folder(tmp_path / "f", tmp_path / "q", model, layout)
    path = export_gguf(tmp_path / "q", tmp_path / "g", float_type="F32", head_type="F32", embedding_type="F32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert tensors["blk.1.ffn_up_exps.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type.name == "Q4_K"
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach()
    blocks = pack_rows("Q8_0", *rtn_block_quantize("Q8_0", gate_up.flatten(0, 1))).view(4, 1536, -1)
    assert tensors["blk.1.ffn_up_exps.weight"].data.tobytes() == blocks[:, 768:].contiguous().numpy().tobytes()
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


def test_stack_expert_blocks_and_one_line_errors(tmp_path):
    rows = [torch.randint(0, 256, (6, 34), dtype=torch.uint8) for _ in range(3)]
    stacked = stack_expert_blocks(rows)
    assert stacked.shape == (3, 6, 34) and torch.equal(stack_expert_blocks(stacked), stacked)
    assert stacked.numpy().tobytes() == b"".join(r.numpy().tobytes() for r in rows)  # llama.cpp's 3-D layout
    for bad in ([rows[0], rows[1][:5]], [r.float() for r in rows], []):
        with pytest.raises(FormatError, match="one uint8") as exc:
            stack_expert_blocks(bad)
        assert "\n" not in str(exc.value)
    t = ExpertTensor("blk.0.ffn_down_exps.weight", "model.layers.0.mlp.experts", "down_proj", "qweight", None)
    schemes = {f"model.layers.0.mlp.experts.{e}.down_proj": {"gguf_type": k} for e, k in enumerate(["Q4_K", "Q6_K"])}
    with pytest.raises(FormatError, match="one type"):
        expert_type(schemes, t, 2)


@pytest.mark.parametrize("family,change,message", [
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "dense MLP"),
    ("llama3_rope", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE type"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "soft-capping"),
])
def test_configs_llama_cpp_would_run_differently_are_refused(tmp_path, family, change, message):
    _save(family, tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    (tmp_path / "f" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FormatError, match=message) as exc:
        export_gguf(tmp_path / "f", tmp_path / "g")
    assert "\n" not in str(exc.value) and not (tmp_path / "g").exists()


@pytest.mark.parametrize("rope,keys", [
    ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
     {"type": "yarn", "factor": 4.0, "original_context_length": 64}),
])
def test_rope_scaling_metadata(tmp_path, rope, keys):
    """Linear and YaRN scaling are llama.cpp metadata (``<arch>.rope.scaling.*``), as its converter writes them."""
    torch.manual_seed(0)
    config = _config("qwen3")
    config.rope_parameters = {**config.rope_parameters, **rope}
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "f")
    tiny_tokenizer().save_pretrained(tmp_path / "f")
    fields = _fields(export_gguf(tmp_path / "f", tmp_path / "g"))
    assert {k: fields[f"qwen3.rope.scaling.{k}"] for k in keys} == keys
    assert fields["qwen3.rope.freq_base"] == 10000.0


def test_phi3_longrope_factors(tmp_path):
    """Phi-3's longrope: llama.cpp's ``rope_factors_long`` / ``rope_factors_short`` tensors and attention factor
    (transformers' GGUF loader reads neither)."""
    long, short = [1.0 + i for i in range(8)], [1.0 + i / 8 for i in range(8)]
    rope = {"rope_type": "longrope", "long_factor": long, "short_factor": short, "rope_theta": 10000.0}
    config = tf.Phi3Config(intermediate_size=128, pad_token_id=0, original_max_position_embeddings=64,
                           rope_parameters=rope, **_SIZES)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "f")
    tiny_tokenizer().save_pretrained(tmp_path / "f")
    path = export_gguf(tmp_path / "f", tmp_path / "g")
    tensors = {t.name: t.data.tolist() for t in gguf.GGUFReader(str(path)).tensors}
    assert tensors["rope_factors_long.weight"] == long and tensors["rope_factors_short.weight"] == short
    fields = _fields(path)
    assert fields["phi3.rope.scaling.original_context_length"] == 64
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + math.log(4) / math.log(64)) ** 0.5)
