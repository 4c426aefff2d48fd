"""Tiny models of every family hfquant supports, for ``tests/test_families.py`` (the README's family table).

Two configs per family:

* the **GPTQ leg** (W4 g16 GPTQ, reload, GPTQ and compressed-tensors exports): the dense configs below, and
  ``moe_helpers.moe_config`` for the Mixture-of-Experts families;
* the **GGUF leg** (Q4_0 GPTQ, GGUF export, transformers' read-back): the same config, except where transformers'
  GGUF loader (5.25) does not read a field back from the file and so builds the model with the config class's
  default (``tests/formats/test_gguf_families.py`` measured which): Qwen3's ``head_dim`` (128), Qwen2-MoE's and
  Qwen3-MoE's expert widths, and Gemma 3's ``query_pre_attn_scalar`` (256 = ``head_dim``) with llama.cpp's
  5-sliding-then-1-global layer pattern (6 layers); and OLMoE's and Granite-MoE's expert width (64: Q4_0 blocks of 32
  must fit every expert projection's rows). ``GGUF_LEG_DIFFERS`` says which families use another config, and
  ``GGUF_LEG_METHOD`` which are quantized by RTN there (for time: GPTQ on the default expert widths).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from helpers import tiny_tokenizer
from moe_helpers import ATTN, MOE_FAMILIES, moe_config, save_moe_model

DENSE_FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "granite")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES

_SIZES = ATTN
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
# How the GGUF leg's model differs from the GPTQ leg's (the families not named use the same config).
GGUF_LEG_DIFFERS = {
    "qwen3": "head_dim 128 (transformers' GGUF loader reads no key_length for qwen3)",
    "gemma3": "6 layers, head_dim 256 (the loader reads no query_pre_attn_scalar for gemma3)",
    "qwen2_moe": "expert widths 1408 / shared 5632, the config defaults the loader falls back to; quantized by RTN "
                 "(GPTQ on the 5632-wide shared expert takes over a minute on a CPU)",
    "qwen3_moe": "expert width 768, the config default the loader falls back to; quantized by RTN (time)",
    "olmoe": "expert width 64 (at 48, down_proj's rows fit no Q4_0 32-block and would stay float)",
    "granitemoe": "expert width 64 (at 48, down_proj's rows fit no Q4_0 32-block and would stay float)",
}
GGUF_LEG_METHOD = {"qwen2_moe": "rtn", "qwen3_moe": "rtn"}  # else GPTQ
# What each tiny model exercises, for the table's notes.
FEATURES = {
    "llama": "tied embeddings",
    "llama3": "llama3 RoPE scaling, which GGUF stores as llama.cpp's rope_freqs tensor: transformers' GGUF loader "
              "reads neither it nor a RoPE scaling key",
    "mistral": "",
    "qwen2": "q/k/v biases",
    "qwen3": "q/k norms",
    "gemma3": "sliding + full attention, q/k norms",
    "phi3": "fused qkv_proj and gate_up_proj",
    "granite": "embedding / residual / attention / logit multipliers",
    "mixtral": "4 experts, top-2",
    "qwen2_moe": "shared expert with its gate",
    "qwen3_moe": "q/k norms",
    "gpt_oss": "expert biases, interleaved gate/up, sinks, sliding layers",
    "deepseek_v3": "MLA attention (q_lora_rank 24: not a multiple of the group size 16), dense first layer, "
                   "shared expert, grouped routing",
    "olmoe": "",
    "granitemoe": "",
}


def _dense_config(family: str, gguf_leg: bool):
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=128, tie_word_embeddings=True, **_SIZES)
    if family == "llama3":
        return tf.LlamaConfig(intermediate_size=128, rope_parameters=dict(_LLAMA3_ROPE), **_SIZES)
    if family == "mistral":
        return tf.MistralConfig(intermediate_size=128, sliding_window=None, **_SIZES)
    if family == "qwen2":
        return tf.Qwen2Config(intermediate_size=128, tie_word_embeddings=False, **_SIZES)
    if family == "qwen3":
        return tf.Qwen3Config(intermediate_size=128, head_dim=128 if gguf_leg else 16, **_SIZES)
    if family == "gemma3" and gguf_leg:
        sizes = {**_SIZES, "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1}
        return tf.Gemma3TextConfig(intermediate_size=128, sliding_window=8, **sizes)
    if family == "gemma3":
        return tf.Gemma3TextConfig(intermediate_size=128, head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"],
                                   **{**_SIZES, "num_key_value_heads": 1})
    if family == "phi3":
        return tf.Phi3Config(intermediate_size=128, pad_token_id=0, original_max_position_embeddings=256, **_SIZES)
    if family == "granite":
        return tf.GraniteConfig(intermediate_size=128, embedding_multiplier=12.0, residual_multiplier=0.22,
                                attention_multiplier=0.0625, logits_scaling=8.0, **_SIZES)
    raise ValueError(family)


def _moe_gguf_config(family: str):
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **ATTN)
    if family == "granitemoe":
        return tf.GraniteMoeConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **ATTN)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=1408,
                                 shared_expert_intermediate_size=5632, num_experts=4, num_experts_per_tok=2, **_SIZES)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=768, num_experts=4,
                                 num_experts_per_tok=2, head_dim=16, norm_topk_prob=True, **_SIZES)
    return moe_config(family)


def family_config(family: str, gguf_leg: bool = False):
    """The tiny config of ``family`` for the GPTQ leg, or (``gguf_leg``) for the GGUF leg."""
    if family in MOE_FAMILIES:
        return _moe_gguf_config(family) if gguf_leg else moe_config(family)
    return _dense_config(family, gguf_leg)


def save_family_model(family: str, folder: Path, gguf_leg: bool = False, seed: int = 0) -> Path:
    """A seeded tiny float model of ``family`` saved with the tiny tokenizer: ``moe_helpers.save_moe_model`` for
    the MoE families' GPTQ leg; otherwise built here the same way (MoE routers get larger weights than the default
    initialisation, so every expert sees tokens) and with its 1-D weights (norms) moved off their initial values, so
    the norms' places in the exports are tested."""
    if family in MOE_FAMILIES and not gguf_leg:
        return save_moe_model(family, folder, seed)
    torch.manual_seed(seed)
    config = family_config(family, gguf_leg)
    model = tf.AutoModelForCausalLM.from_config(config)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) \
        or getattr(config, "n_routed_experts", None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif experts and p.dim() == 2 and p.shape[0] == experts and "experts" not in name:
                p.normal_(0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
