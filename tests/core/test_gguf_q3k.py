"""The 3-bit K-quant mixes (Q3_K_M, Q3_K_S) and the block types they need beside the older ones (Q3_K, Q5_K, Q5_1):
bytes that gguf-py de-quantizes to exactly hfquant's weights, llama.cpp's per-tensor type rules, GPTQ on Q3_K, and an
exported tiny Llama that transformers' GGUF reader runs with hfquant's logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gptq_kw, small_calibration, tiny_tokenizer, VOCAB

from hfquant import HFQuantConfig
from hfquant.core import gguf_types
from hfquant.core.errors import ConfigError
from hfquant.core.gguf_blocks import BLOCK_TYPES, dequantize_codes, pack_rows, unpack_rows
from hfquant.core.gguf_grids import _fit_q3k_sub_blocks, fit_block_grid, rtn_block_quantize

gguf = pytest.importorskip("gguf")
NEW = ["Q3_K", "Q5_K", "Q5_1"]


def _weights(rows, cols, seed=0):
    """Heavy-tailed weights (Student-t, 3 degrees of freedom), a zero row and a constant row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp(min=0.05).sqrt() * 0.02
    w[1] = 0.0
    w[2] = 0.013
    return w


def _problem(rows=32, cols=512, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.1 + torch.eye(cols))
    w = _weights(rows, cols, seed)
    return w, x, 2 * x.T @ x / n


def _gguf_dequantize(name, blocks):
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), getattr(gguf.GGMLQuantizationType, name)))


@pytest.mark.parametrize("name", NEW)
def test_new_types_match_gguf_geometry(name):
    bt = BLOCK_TYPES[name]
    qt = getattr(gguf.GGMLQuantizationType, name)
    assert (bt.ggml_type, bt.block_values, bt.block_bytes) == (int(qt), *gguf.GGML_QUANT_SIZES[qt])


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_packed_blocks_dequantize_in_gguf_to_hfquants_weights(name, method):
    """RTN's and GPTQ's blocks, read by gguf-py's de-quantizer, are bit for bit the weights hfquant computed."""
    w, _, h = _problem(rows=16, cols=512)
    if method == "rtn":
        codes, params = rtn_block_quantize(name, w)
        ours = dequantize_codes(name, codes, params)
        blocks = pack_rows(name, codes, params)
    else:
        res = gptq_kw(w, h, gguf_type=name)
        ours, blocks = res.dequantized(), res.blocks
    assert blocks.shape == (16, 512 // BLOCK_TYPES[name].block_values * BLOCK_TYPES[name].block_bytes)
    assert torch.equal(_gguf_dequantize(name, blocks).reshape(16, 512), ours)
    codes, params = unpack_rows(name, blocks, 512)
    assert torch.equal(pack_rows(name, codes, params), blocks)
    assert ours[1].abs().max() == 0  # a zero row stays zero
    assert float(((ours - w) ** 2).mean()) < 0.2 * float((w ** 2).mean())


def test_q3k_layout_by_hand():
    """One Q3_K block laid out as ggml-common.h's block_q3_K: hmask, qs, 12 scale bytes, then d."""
    q = torch.zeros(1, 256, dtype=torch.int32)
    q[0, 0] = 7  # low bits 3 -> qs[0] bits 0-1; high bit -> hmask[0] bit 0
    q[0, 32 + 5] = 4  # high bit only -> hmask[5] bit 1
    q[0, 128 + 96 + 1] = 2  # second half, s = 3 -> qs[32 + 1] bits 6-7
    sc = torch.zeros(1, 16, dtype=torch.int8)
    sc[0, 0], sc[0, 9], sc[0, 15] = 31, -32, 5  # stored as sc + 32: 63, 0, 37
    data = pack_rows("Q3_K", q, {"d": torch.full((1, 1), 2.0).half(), "sc": sc}).tolist()[0]
    hmask, qs, scales, d = data[:32], data[32:96], data[96:108], data[108:]
    assert hmask[0] == 1 and hmask[5] == 2 and sum(hmask) == 3
    assert qs[0] == 3 and qs[33] == 2 << 6 and sum(qs) == 3 + (2 << 6)
    u = [32] * 16
    u[0], u[9], u[15] = 63, 0, 37
    assert scales[:8] == [(u[j] & 15) | (u[j + 8] & 15) << 4 for j in range(8)]
    assert scales[8:] == [sum((u[4 * g + k] >> 4) << 2 * g for g in range(4)) for k in range(4)]
    assert d == [0x00, 0x40]  # fp16 2.0, little-endian
    y = _gguf_dequantize("Q3_K", torch.tensor([data], dtype=torch.uint8)).reshape(256)
    assert y[0] == 2.0 * 31 * 3 and y[1] == 2.0 * 31 * -4 and y[37] == 0  # (d * sc) * (q - 4)
    assert y[144] == 2.0 * -32 * -4 and y[240] == 2.0 * 5 * -4 and y[225] == 0  # sc[14] = 0


def test_q3k_scale_search_is_no_worse_than_the_signed_max():
    """The level search only accepts moves that raise ``(sum w x L)^2 / sum w L^2``, so on the nearest levels its
    scale's weighted error is never above the signed-max scale's (``max / -4``)."""
    x = _weights(64, 256, seed=3).view(64, 16, 16)
    scale = _fit_q3k_sub_blocks(x)
    m = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)

    def err(s):
        safe = torch.where(s == 0, torch.ones_like(s), s)
        levels = torch.clamp(torch.round(x / safe[..., None]), -4, 3)
        return (x * x * (s[..., None] * levels - x) ** 2).sum(-1)
    live = m.abs() > 0
    assert (err(scale)[live] <= err(m / -4)[live] * (1 + 1e-5)).all()
    assert (err(scale)[live] < err(m / -4)[live]).any()


def test_q3k_grid_keeps_sub_scales_in_range():
    g = fit_block_grid("Q3_K", _weights(8, 512))
    assert g.params["sc"].dtype == torch.int8 and g.scale.shape == (8, 32) and g.zero == 4
    assert g.params["sc"].min() >= -32 and g.params["sc"].max() <= 31
    assert g.code_range == (0, 7)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_q3k_beats_rtn(act_order):
    """GPTQ's output error on the Q3_K grid is at most RTN's on the same data."""
    w, x, h = _problem(rows=48, cols=512, seed=1)
    rtn = dequantize_codes("Q3_K", *rtn_block_quantize("Q3_K", w))
    res = gptq_kw(w, h, act_order=act_order, static_groups=act_order, gguf_type="Q3_K")

    def out_err(wq):
        return float(((x @ (w - wq).T) ** 2).mean())
    assert out_err(res.dequantized()) <= out_err(rtn)


# --- llama.cpp's per-tensor rules ----------------------------------------------------------------------------------


def _llama_cpp_q3_k(ftype, tensor, i, n_layer, cols):
    """llama.cpp's type for a dense Llama's tensor, restated from ``llama-quant.cpp`` (llama-cpp-python 0.3.36) in
    GGUF tensor names, as a cross-check of ``gguf_types`` (which works on HF module names):
    ``llama_tensor_get_type_impl`` gives Q3_K_M's attn_v ``i_attention_wv < 2 ? Q5_K : Q4_K``, ffn_down
    ``i_layer < n_layer/16 ? Q5_K : Q4_K`` (its Q3_K branch is Falcon's), attn_output Q4_K; Q3_K_S keeps the
    default Q3_K for dense models; then ``tensor_type_fallback``: Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1 when
    ``cols % 256``."""
    t = "Q3_K"
    if ftype == "Q3_K_M":
        t = {"attn_v": "Q5_K" if i < 2 else "Q4_K", "ffn_down": "Q5_K" if i < n_layer // 16 else "Q4_K",
             "attn_output": "Q4_K"}.get(tensor, "Q3_K")
    if cols % 256:
        t = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1"}[t]
    return t


_LLAMA = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


@pytest.mark.parametrize("ftype", ["Q3_K_M", "Q3_K_S"])
@pytest.mark.parametrize("layers,hidden,inter", [(30, 576, 1536), (32, 4096, 11008), (40, 5120, 13824)])
def test_type_rules_are_llama_cpps(ftype, layers, hidden, inter):
    """SmolLM2's shapes (576 = not a multiple of 256, 1536 = 6 x 256) and Llama-7B/13B's (all multiples of 256)."""
    modules = {f"model.layers.{i}.{m}": (inter if m == "mlp.down_proj" else hidden)
               for i in range(layers) for m in _LLAMA}
    types = gguf_types.module_types(modules, ftype)
    for name, cols in modules.items():
        i = int(name.split(".")[2])
        assert types[name] == _llama_cpp_q3_k(ftype, _LLAMA[name.split(".", 3)[3]], i, layers, cols), name
    assert gguf_types.head_type(ftype, hidden) == ("Q8_0" if hidden % 256 else "Q6_K")
    assert gguf_types.embedding_type(ftype, hidden) == ("Q4_0" if hidden % 256 else "Q3_K")
    if layers == 30:  # SmolLM2: Q3_K never fits a 576-wide row; ffn_down of layer 0 (< 30 // 16) is Q5_K
        assert {types[f"model.layers.0.{m}"] for m in _LLAMA} == (
            {"Q4_0", "Q5_1", "Q5_0", "Q5_K"} if ftype == "Q3_K_M" else {"Q4_0", "Q3_K"})


def test_config_accepts_the_3_bit_mixes_and_rejects_unknown_types():
    for name in ("Q3_K_M", "Q3_K_S", "Q3_K"):
        c = HFQuantConfig(gguf_type=name)
        assert (c.bits, c.group_size, c.sym) == (3, 16, True)
        assert HFQuantConfig.from_dict(c.to_dict()) == c
    assert HFQuantConfig(gguf_type="Q5_K").bits == 5 and HFQuantConfig(gguf_type="Q5_1").sym is False
    with pytest.raises(ConfigError, match="Q3_K_M") as e:
        HFQuantConfig(gguf_type="Q3_K_L")
    assert "\n" not in str(e.value)


# --- a tiny Llama through the exporter and transformers' GGUF reader ------------------------------------------------


def _tiny_llama(folder, hidden, tie):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, vocab_size=VOCAB)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,hidden,tie", [("Q3_K_M", 256, True), ("Q3_K_M", 160, False), ("Q3_K_S", 256, False)])
def test_export_has_llama_cpps_types_and_transformers_logits(tmp_path, kind, hidden, tie):
    """GPTQ with ``gguf_type`` Q3_K_M / Q3_K_S on a 3-layer Llama, rows of 256 (Q3_K fits) or 160 (it falls back):
    the file's tensor types are llama.cpp's, and transformers' GGUF reader and ``load_gguf`` give the hfquant
    model's logits exactly."""
    import transformers as tf

    from hfquant.formats import export_gguf, load_gguf

    src = _tiny_llama(tmp_path / "f", hidden, tie)
    model = tf.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=HFQuantConfig(gguf_type=kind, **small_calibration()))
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    path = export_gguf(tmp_path / "q", tmp_path / "g")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert int(reader.fields["general.file_type"].contents()) == int(getattr(gguf.LlamaFileType, f"MOSTLY_{kind}"))
    for i in range(3):
        for tensor in _LLAMA.values():
            cols = 512 if tensor == "ffn_down" else hidden
            assert types[f"blk.{i}.{tensor}.weight"] == _llama_cpp_q3_k(kind, tensor, i, 3, cols), (i, tensor)
    assert types["token_embd.weight"] == ("Q6_K" if tie else "Q3_K" if hidden % 256 == 0 else "Q4_0")
    if not tie:
        assert types["output.weight"] == ("Q6_K" if hidden % 256 == 0 else "Q8_0")
    with torch.no_grad():
        loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        assert torch.equal(loaded(ids).logits, ref)
        assert torch.equal(load_gguf(path)(ids).logits, ref)


def test_fused_qkv_counts_as_attn_v_and_experts_use_their_layer():
    """llama.cpp treats ``attn_qkv`` (Phi-3's ``qkv_proj``) as an ``attn_v`` tensor, and for MoE experts takes the
    ``ffn_down`` layer from the tensor's name rather than a running count."""
    qkv = {f"model.layers.{i}.self_attn.qkv_proj": 3072 for i in range(32)}
    types = gguf_types.module_types(qkv, "Q3_K_M")
    assert [types[f"model.layers.{i}.self_attn.qkv_proj"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    types = gguf_types.module_types(qkv, "Q4_K_M")
    assert [i for i in range(32) if types[f"model.layers.{i}.self_attn.qkv_proj"] == "Q6_K"] == [
        i for i in range(32) if gguf_types.use_more_bits(i, 32)]
    experts = {f"model.layers.{i}.mlp.experts.{e}.down_proj": 1024 for i in range(32) for e in range(4)}
    types = gguf_types.module_types(experts, "Q3_K_M")
    assert {types[f"model.layers.{i}.mlp.experts.{e}.down_proj"] for i in range(2) for e in range(4)} == {"Q5_K"}
    assert {types[f"model.layers.{i}.mlp.experts.3.down_proj"] for i in range(2, 32)} == {"Q4_K"}
