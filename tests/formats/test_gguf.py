"""GGUF: GPTQ and RTN on llama.cpp's block grids, the per-tensor type rules, the exporter, and reading it back.

The exporter's file is read back by transformers' GGUF loader (``gguf_file=``), which must give the same logits
as the hfquant model that wrote it: the grids GPTQ calibrated against are the ones the file stores.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import gptq_kw, run_cli, small_calibration, tiny_tokenizer, VOCAB

from hfquant import HFQuantConfig
from hfquant.core.errors import ConfigError, FormatError
from hfquant.core.gguf_blocks import BLOCK_TYPES, dequantize_codes, dequantize_rows, pack_rows, unpack_rows
from hfquant.core.gguf_grids import fit_block_grid, rtn_block_quantize
from hfquant.core import gguf_types

gguf = pytest.importorskip("gguf")
TYPES = list(BLOCK_TYPES)


def _problem(rows=48, cols=512, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.1 + torch.eye(cols))
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :40] *= 8  # an outlier run
    return w, x, 2 * x.T @ x / n


def _out_err(x, w, wq):
    return float(((x @ (w - wq).T) ** 2).mean())


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_gguf_grids_beats_rtn_and_stores_what_it_saw(name, act_order):
    """GPTQ's output error is below RTN's on the same GGUF grid, and the packed blocks de-quantize to exactly the
    weight the solve computed its errors with."""
    w, x, h = _problem()
    codes, params = rtn_block_quantize(name, w)
    rtn = dequantize_codes(name, codes, params)
    res = gptq_kw(w, h, bits=4, group_size=32, sym=True, act_order=act_order, static_groups=act_order,
                        gguf_type=name)
    assert _out_err(x, w, res.dequantized()) < 0.8 * _out_err(x, w, rtn)
    codes, params = unpack_rows(name, res.blocks, w.shape[1])
    assert torch.equal(dequantize_codes(name, codes, params), res.dequantized())
    assert torch.equal(dequantize_rows(name, pack_rows(name, codes, params), w.shape[1]), res.dequantized())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_simple_grids_store_llama_cpps_scales(name):
    """The stored d (and m) are llama.cpp's reference choice: equal to gguf-py's quantizer's, byte for byte; the
    codes are the nearest on that stored grid, so the error is never above the reference's."""
    from hfquant.core.gguf_blocks import unpack_rows

    w, _, _ = _problem(rows=16, cols=256)
    ref = torch.from_numpy(gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, name)))
    _, ref_params = unpack_rows(name, ref, 256)
    codes, params = rtn_block_quantize(name, w)
    for k in ref_params:
        assert torch.equal(params[k], ref_params[k]), k
    ours = ((dequantize_codes(name, codes, params) - w) ** 2).sum()
    assert ours <= ((dequantize_rows(name, ref, 256) - w) ** 2).sum()


def test_q4k_search_is_no_worse_than_min_max():
    """The Q4_K sub-block search keeps the min-max grid as a candidate, so its weighted error is never above it."""
    from hfquant.core.gguf_grids import _fit_q4k_sub_blocks

    w, _, _ = _problem(rows=8, cols=256)
    x = w.view(8, 8, 32)
    weights = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    scale, mn = _fit_q4k_sub_blocks(x, weights)
    lo = x.min(-1).values.clamp(max=0)
    s0 = (x.max(-1).values - lo) / 15

    def err(s, m):
        levels = torch.clamp(torch.round((x - m[..., None]) / s[..., None]), 0, 15)
        return (weights * (s[..., None] * levels + m[..., None] - x) ** 2).sum(-1)
    assert (mn <= 0).all()
    assert (err(scale, mn) <= err(s0, lo) * (1 + 1e-6)).all()


def test_k_quant_grid_keeps_sub_scales_in_range():
    w, _, _ = _problem(rows=4, cols=512)
    g = fit_block_grid("Q4_K", w)
    assert g.params["sc"].max() <= 63 and g.params["mn"].max() <= 63 and g.scale.shape == (4, 16)
    g6 = fit_block_grid("Q6_K", w)
    assert g6.params["sc"].dtype == torch.int8 and g6.scale.shape == (4, 32)


def test_llama_cpp_type_rules_for_smollm2_shapes():
    """Q4_K_M on a 30-layer model with 576 hidden / 1536 intermediate features, as llama.cpp decides: attn_v and
    ffn_down of the use_more_bits layers get Q6_K, 576-wide rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    modules = {}
    for i in range(30):
        for short, cols in (("self_attn.q_proj", 576), ("self_attn.k_proj", 576), ("self_attn.v_proj", 576),
                            ("self_attn.o_proj", 576), ("mlp.gate_proj", 576), ("mlp.up_proj", 576),
                            ("mlp.down_proj", 1536)):
            modules[f"model.layers.{i}.{short}"] = cols
    types = gguf_types.module_types(modules, "Q4_K_M")
    more = [i for i in range(30) if gguf_types.use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        assert types[f"model.layers.{i}.mlp.down_proj"] == ("Q6_K" if i in more else "Q4_K")
        assert types[f"model.layers.{i}.self_attn.v_proj"] == ("Q8_0" if i in more else "Q5_0")
        assert types[f"model.layers.{i}.self_attn.q_proj"] == "Q5_0"
    assert gguf_types.head_type("Q4_K_M", 576) == "Q8_0" and gguf_types.head_type("Q4_K_M", 4096) == "Q6_K"
    assert gguf_types.head_type("Q8_0", 4096) == "Q8_0" and gguf_types.fit_row("Q4_0", 40) == "F16"


@pytest.mark.parametrize("kwargs,message", [
    (dict(gguf_type="Q4_0", bits=8), "bits"),
    (dict(gguf_type="Q4_K", group_size=128), "group_size"),
    (dict(gguf_type="Q4_1", sym=True), "sym"),
    (dict(gguf_type="Q4_0", desc_act=True, static_groups=False), "static_groups"),
    (dict(gguf_type="Q4_0", method="smoothquant"), "method"),
    (dict(gguf_type="Q2_K"), "gguf_type"),
    (dict(save_format="gguf"), "save_format"),
    (dict(gguf_type="Q4_0", overrides={"re:.*": {"bits": 8}}), "overrides"),
    (dict(overrides={"re:.*": {"gguf_type": "Q8_0"}}), "gguf_type"),
])
def test_conflicting_gguf_settings_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as exc:
        HFQuantConfig(**kwargs)
    assert "\n" not in str(exc.value)


def test_gguf_type_sets_the_grid_and_round_trips():
    c = HFQuantConfig(gguf_type="Q4_K_M")
    assert (c.bits, c.group_size, c.sym) == (4, 32, False)
    assert HFQuantConfig.from_dict(c.to_dict()) == c
    assert HFQuantConfig(gguf_type="Q6_K").bits == 6


def _tiny_llama(folder, hidden=256, tie=True):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, vocab_size=VOCAB)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("gguf") / "llama")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind,tie", [("Q4_K_M", True), ("Q4_0", False), ("Q8_0", True), ("Q4_1", True)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kind, tie):
    """hfquant's model, its reload, and transformers' reading of the exported GGUF give the same logits; the
    tokenizer in the file tokenizes as the original does."""
    import transformers as tf

    from hfquant.formats.gguf import export_gguf

    src = _tiny_llama(tmp_path / "f", tie=tie)
    model = tf.AutoModelForCausalLM.from_pretrained(src, quantization_config=HFQuantConfig(gguf_type=kind, **small_calibration()))
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), ref)
    path = export_gguf(tmp_path / "q", tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["model.gguf"]
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    assert torch.equal(_logits(loaded, ids), ref)
    tok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "The quick brown fox, 1234 times."
    assert tok(text)["input_ids"][-8:] == tiny_tokenizer()(text)["input_ids"][-8:]
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == ("Q6_K" if kind == "Q4_K_M" else kind)
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_float_export_is_exact_and_save_format_gguf(tmp_path, llama256):
    import transformers as tf

    from hfquant.formats.gguf import export_gguf

    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    float_model = tf.AutoModelForCausalLM.from_pretrained(llama256)
    path = export_gguf(llama256, tmp_path / "f32", float_type="F32")
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    assert torch.equal(_logits(loaded, ids), _logits(float_model, ids))
    model = tf.AutoModelForCausalLM.from_pretrained(
        llama256, quantization_config=HFQuantConfig(gguf_type="Q4_0", method="rtn", save_format="gguf"))
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.gguf").is_file()
    assert not list((tmp_path / "saved").glob("*.safetensors"))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", gguf_file="model.gguf")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_cli_export_and_its_errors(tmp_path, llama256, tiny_models, capsys):
    import transformers as tf

    code, out, _ = run_cli(["export", llama256, "--format", "gguf", tmp_path / "a", "--float-type", "F16"], capsys)
    assert code == 0 and (tmp_path / "a" / "model.gguf").is_file()
    # an output that exists: one line, nothing touched
    code, _, err = run_cli(["export", llama256, "--format", "gguf", tmp_path / "a"], capsys)
    assert code != 0 and "already exists" in err and len(err.strip().splitlines()) == 1
    # an architecture the exporter does not know
    code, _, err = run_cli(["export", tiny_models["gpt2"], "--format", "gguf", tmp_path / "b"], capsys)
    assert code != 0 and "model_type 'gpt2'" in err and not (tmp_path / "b").exists()
    # an hfquant checkpoint whose grid is not a GGUF one
    model = tf.AutoModelForCausalLM.from_pretrained(llama256, quantization_config=HFQuantConfig(method="rtn", group_size=128))
    model.save_pretrained(tmp_path / "w4")
    code, _, err = run_cli(["export", tmp_path / "w4", "--format", "gguf", tmp_path / "c"], capsys)
    assert code != 0 and "gguf_type" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".c.tmp")]


def test_export_needs_a_tokenizer(tmp_path, llama256):
    import shutil

    from hfquant.formats.gguf import export_gguf

    shutil.copytree(llama256, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match="tokenizer.json"):
        export_gguf(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resume_with_gguf_blocks_is_bit_identical(tmp_path, llama256):
    """A run resumed from a store holding every block's GGUF blocks equals the uninterrupted run."""
    import transformers as tf

    import hfquant
    from hfquant.quantize.resume import ResumeStore

    config = HFQuantConfig(gguf_type="Q4_K_M", tokenizer=tiny_tokenizer(), **small_calibration())
    first = tf.AutoModelForCausalLM.from_pretrained(llama256)
    store = ResumeStore(tmp_path / "progress", "k")
    store.start(resume=False)
    hfquant.quantize_(first, config, progress=False, store=store)
    again = tf.AutoModelForCausalLM.from_pretrained(llama256)
    store = ResumeStore(tmp_path / "progress", "k")
    store.start(resume=True)
    assert store.blocks_done == 2
    hfquant.quantize_(again, config, progress=False, store=store)
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_and_report_with_gguf(tmp_path, llama256):
    """The run's report names the head's and embeddings' types; module_schemes records each module's type."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(llama256, quantization_config=HFQuantConfig(gguf_type="Q4_K_M", **small_calibration()))
    model.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["module_schemes"]["model.layers.1.mlp.down_proj"]["gguf_type"] == "Q6_K"
    assert cfg["module_schemes"]["model.layers.0.mlp.down_proj"]["gguf_type"] == "Q4_K"
    assert model.hfquant_report["gguf"] == {"head": "Q6_K", "embeddings": "Q6_K"}


@pytest.mark.parametrize("save_format", ["hfquant", "gguf"])
def test_recipe_with_gguf_type(tmp_path, llama256, capsys, save_format):
    """``hfquant run`` with ``gguf_type`` (and ``save_format: gguf``): the run evaluates, saves and the output
    loads (hfquant layout: reload; gguf: transformers' GGUF loader)."""
    import transformers as tf
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", llama256, tmp_path / "out",
                          quantization={"method": "gptq", "gguf_type": "Q4_0",
                                        "save_format": save_format})
    code, out, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    if save_format == "gguf":
        assert (tmp_path / "out" / "model.gguf").is_file()
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    else:
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_load_gguf_holds_the_files_blocks_and_exports_them_again(tmp_path, llama256):
    """``load_gguf`` of an exported file: the same blocks as the hfquant model that wrote it, the same logits; saved
    and reloaded in hfquant's layout, it exports a file with identical tensors."""
    import numpy as np
    import transformers as tf

    from hfquant.formats import export_gguf, load_gguf

    model = tf.AutoModelForCausalLM.from_pretrained(llama256, quantization_config=HFQuantConfig(gguf_type="Q4_K_M", method="rtn"))
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    first = export_gguf(tmp_path / "q", tmp_path / "g1")
    loaded = load_gguf(first.parent)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    blocks = {n: m.qweight for n, m in model.named_modules() if hasattr(m, "qweight")}
    assert blocks.keys() == {n for n, m in loaded.named_modules() if hasattr(m, "qweight")}
    assert all(torch.equal(blocks[n], loaded.get_submodule(n).qweight) for n in blocks)
    loaded.save_pretrained(tmp_path / "again")
    tiny_tokenizer().save_pretrained(tmp_path / "again")
    second = export_gguf(tmp_path / "again", tmp_path / "g2")
    a = {t.name: t for t in gguf.GGUFReader(str(first)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(second)).tensors}
    assert a.keys() == b.keys()
    assert all(a[k].tensor_type == b[k].tensor_type and np.array_equal(a[k].data, b[k].data) for k in a)
    with pytest.raises(FormatError, match="exactly one"):
        load_gguf(tmp_path)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_bf16_model_on_gguf_grids(tmp_path, llama256, method):
    """A bf16 model: the GGUF modules keep bf16 biases/outputs, the model reloads with equal logits, and the
    export (read by transformers in float32) computes the same weights: logits within bf16 rounding."""
    import transformers as tf

    from hfquant.formats import export_gguf
    from hfquant.nn.gguf import QuantLinearGGUF

    model = tf.AutoModelForCausalLM.from_pretrained(
        llama256, dtype=torch.bfloat16,
        quantization_config=HFQuantConfig(gguf_type="Q4_K_M", method=method, **small_calibration()))
    mods = [m for m in model.modules() if isinstance(m, QuantLinearGGUF)]
    assert mods and all(m.dtype == torch.bfloat16 for m in mods)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, ids)
    assert ref.dtype == torch.bfloat16 and torch.isfinite(ref).all()
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), ref)
    path = export_gguf(tmp_path / "q", tmp_path / "g")
    f32 = _logits(tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name), ids)
    assert ((f32 - ref.float()).abs().max() / ref.float().abs().max()) < 3e-2


def _llama_style_tokenizer(vocab: int = 400):
    """A SentencePiece-style BPE with byte fallback, as Llama 2 and Mistral ship in tokenizer.json."""
    from tokenizers import decoders, models, normalizers, Tokenizer, trainers
    from transformers import PreTrainedTokenizerFast

    from hfquant.calibration.data import BUNDLED_CALIBRATION

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]]
    tok.train_from_iterator([BUNDLED_CALIBRATION.read_text()[:30000]],
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_mistral_with_a_byte_fallback_tokenizer(tmp_path):
    """Mistral (GGUF ``llama``) with a Llama-2-style tokenizer: the file's ``llama`` tokenizer tokenizes as the
    original (after the BOS the GGUF tokenizer adds), and the logits are the hfquant model's."""
    import transformers as tf

    from hfquant.formats import export_gguf

    torch.manual_seed(0)
    cfg = tf.MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, vocab_size=400, sliding_window=None,
                           tie_word_embeddings=False)
    tok = _llama_style_tokenizer()
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "f")
    tok.save_pretrained(tmp_path / "f")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=HFQuantConfig(gguf_type="Q4_0", method="rtn"))
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    path = export_gguf(tmp_path / "q", tmp_path / "g")
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_logits(tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name), ids),
                       _logits(model, ids))
    back = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("Hello world, 123 times.", "The quick brown fox jumps over the lazy dog."):
        assert back(text)["input_ids"][1:] == tok(text)["input_ids"]
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"].contents() == "llama"


def test_qwen2_export_with_biases(tmp_path):
    """GGUF ``qwen2``: q/k/v biases travel as F32 tensors, no rotary permutation; logits equal in transformers."""
    import transformers as tf

    from hfquant.formats import export_gguf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "f")
    tiny_tokenizer().save_pretrained(tmp_path / "f")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=HFQuantConfig(gguf_type="Q4_K_M", method="rtn"))
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    path = export_gguf(tmp_path / "q", tmp_path / "g")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    assert torch.equal(_logits(tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name), ids),
                       _logits(model, ids))
    fields = gguf.GGUFReader(str(path))
    assert fields.fields["general.architecture"].contents() == "qwen2"
    assert {t.name: t.tensor_type.name for t in fields.tensors}["blk.0.attn_q.bias"] == "F32"


# --- issue 31, 5: the file holds the head hfquant evaluated; GGUF run folders everywhere --------------------------


def _heavy_tailed_llama(folder, hidden, tie):
    """A tiny Llama whose token embeddings (and untied head) have heavy tails, as trained ones do (Student-t, 3
    degrees of freedom). Rounding such rows to Q6_K or Q4_K a second time is not the identity (their scales are
    searched), which the initialisation's Gaussian rows hide."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, vocab_size=VOCAB)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    t = torch.distributions.StudentT(3.0)
    with torch.no_grad():
        for module in {model.get_input_embeddings(), model.get_output_embeddings()}:
            module.weight.copy_(t.sample(module.weight.shape) * 0.02)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,hidden,tie,types", [("Q4_0", 256, True, {"token_embd": "Q6_K"}),
                                                   ("Q4_0", 64, True, {"token_embd": "Q8_0"}),
                                                   ("Q4_K_M", 256, False, {"token_embd": "Q4_K", "output": "Q6_K"})])
def test_the_file_holds_the_head_the_model_evaluated(tmp_path, kind, hidden, tie, types):
    """The GGUF file's head / token-embedding blocks de-quantize bit for bit to the weights the quantized model held,
    so the file's logits (``load_gguf`` and transformers' GGUF loader) equal the model's: ``torch.equal``, the same
    float32 weights in the same operations (the q/k row permutation is exact), no tolerance. Also through the hfquant
    layout: save, reload (the blocks travel in ``gguf_blocks``), export. Rounding the rounded weight again (what the
    writer did) moved the logits by 0.02-0.14 here."""
    import transformers as tf

    from hfquant.formats import export_gguf, load_gguf

    src = _heavy_tailed_llama(tmp_path / "f", hidden, tie)
    model = tf.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=HFQuantConfig(gguf_type=kind, method="rtn", save_format="gguf"))
    held = {"token_embd": model.get_input_embeddings().weight, "output": model.get_output_embeddings().weight}
    for name, t in types.items():
        if t in ("Q6_K", "Q4_K"):  # the case this test is about: a second rounding changes these rows
            assert not torch.equal(dequantize_codes(t, *rtn_block_quantize(t, held[name])), held[name])
    model.save_pretrained(tmp_path / "g")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors}
    assert ("output.weight" in tensors) == (not tie)
    for name, t in types.items():
        stored = tensors[f"{name}.weight"]
        assert stored.tensor_type.name == t
        data = torch.from_numpy(stored.data.copy()).reshape(VOCAB, -1)
        assert torch.equal(dequantize_rows(t, data, hidden), held[name]), name
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7))
    ref = _logits(model, ids)
    assert torch.equal(_logits(load_gguf(tmp_path / "g"), ids), ref)
    assert torch.equal(_logits(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf"), ids), ref)
    model.config.quantization_config.save_format = "hfquant"
    model.save_pretrained(tmp_path / "h")
    tiny_tokenizer().save_pretrained(tmp_path / "h")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert torch.equal(_logits(reloaded, ids), ref)
    path = export_gguf(tmp_path / "h", tmp_path / "e")
    assert torch.equal(_logits(tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name), ids), ref)


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    """``hfquant run`` with ``save_format: gguf`` (RTN Q4_0, tied Q6_K head): the output folder and the run's stdout."""
    import contextlib
    import io

    from helpers import write_recipe

    from hfquant.app.cli import main

    root = tmp_path_factory.mktemp("gguf-run")
    src = _heavy_tailed_llama(root / "f", 256, tie=True)
    recipe = write_recipe(root / "r.yaml", src, root / "out",
                          quantization={"method": "rtn", "gguf_type": "Q4_0", "save_format": "gguf"})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--quiet", "run", str(recipe)]) == 0
    return root / "out", out.getvalue()


def test_gguf_run_summary_shows_the_files_size(gguf_run):
    out, stdout = gguf_run
    assert sorted(p.name for p in out.glob("*.gguf")) == ["model.gguf"] and not (out / "config.json").exists()
    size = (out / "model.gguf").stat().st_size
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint_bytes"] == size > 0
    assert f"| {size / 2**20:.1f} |" in stdout and f"{size / 2**20:.1f}" != "0.0"
    assert report["stored_bits"]["avg_bits"] == 4.5 and "4.5000 stored bits per weight" in stdout  # Q4_0: 18 B / 32
    assert 'gguf_file="model.gguf"' in (out / "README.md").read_text()  # the card loads the file it describes


def test_eval_and_inspect_of_a_gguf_run_folder_and_a_bare_file(gguf_run, tmp_path, capsys):
    """``eval`` of the folder reads ``model.gguf`` with the folder's tokenizer and reproduces the run's perplexity;
    a bare ``.gguf`` without a tokenizer beside it is evaluated with the one transformers builds from the file;
    ``inspect`` shows the file's architecture, types and sizes (and the run's table when report.json is there)."""
    import shutil

    out, _ = gguf_run
    after = json.loads((out / "report.json").read_text())["evaluation"]["after"]
    code, stdout, err = run_cli(["--quiet", "eval", out], capsys)
    assert code == 0, err
    assert f"perplexity {after:.3f}" in stdout and "model.gguf" in stdout
    code, stdout, err = run_cli(["--quiet", "eval", out / "model.gguf"], capsys)
    assert code == 0 and f"perplexity {after:.3f}" in stdout, err
    (tmp_path / "bare").mkdir()
    shutil.copy(out / "model.gguf", tmp_path / "bare" / "x.gguf")
    code, stdout, err = run_cli(["--quiet", "eval", tmp_path / "bare" / "x.gguf", "--seq-len", "64",
                                 "--max-tokens", "512"], capsys)
    assert code == 0 and "perplexity" in stdout and "x.gguf" in stdout, err
    code, stdout, err = run_cli(["inspect", out], capsys)
    assert code == 0, err
    size = (out / "model.gguf").stat().st_size
    assert "GGUF llama" in stdout and f"size: {size / 2**20:.1f} MiB in model.gguf" in stdout
    assert "Q4_0 14 " in stdout and "Q6_K 1 " in stdout and "quantized modules: 14 (4.5000 stored bits" in stdout
    assert "gguf_type Q4_0" in stdout and stdout.count("| model.layers.") == 14
    code, stdout, err = run_cli(["inspect", tmp_path / "bare" / "x.gguf"], capsys)
    assert code == 0 and "GGUF llama" in stdout and "no report.json" in stdout, err
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["x.gguf"]  # nothing written beside it
