"""The architecture metadata of a GGUF file written by ``hfquant.formats.gguf``: llama.cpp's keys for each GGUF
architecture, from the saved HF config, as llama.cpp's converter writes them; the RoPE scaling llama.cpp states as
tensors (``rope_freqs`` for Llama 3's, ``rope_factors_long`` / ``rope_factors_short`` for Phi-3's longrope); and the
configs llama.cpp would compute differently from transformers, refused with one line.

transformers' GGUF loader reads back only some of these keys (``transformers.integrations.ggml``): none of the RoPE
scaling, the expert widths or Granite's multipliers, so a file that states them loads in transformers with that
architecture's config defaults for them (see ``tests/formats/test_gguf_families.py``).
"""

from __future__ import annotations

import logging
import math

import torch

from hfquant.core.errors import FormatError

logger = logging.getLogger(__name__)

_MOE = {"qwen2moe", "qwen3moe"}
# llama.cpp's top-k routing renormalization per GGUF architecture (its graph's fixed choice, no metadata key).
_TOPK_NORM = {"qwen2moe": False, "qwen3moe": True}
# Gemma 3 in llama.cpp: local layers use RoPE base 10000 and every 6th layer is global (both fixed).
_GEMMA3_LOCAL_THETA, _GEMMA3_PATTERN = 10000.0, 6


def rope_parameters(cfg: dict) -> dict:
    """The config's RoPE settings as one dict (``rope_type``, ``rope_theta`` and the scaling's own keys), from
    transformers 5.x ``rope_parameters`` (Gemma 3's per attention kind: its full-attention entry) or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    params.update(cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta"))
    params["partial_rotary_factor"] = params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def check_config(cfg: dict, arch: str, folder) -> None:
    """``FormatError`` (one line) for a config llama.cpp's ``arch`` would run as a different model."""
    if arch in _MOE:
        if bool(cfg.get("norm_topk_prob")) != _TOPK_NORM[arch]:
            raise FormatError(f"{folder}: norm_topk_prob is {bool(cfg.get('norm_topk_prob'))}, but llama.cpp's {arch} "
                              f"always uses {_TOPK_NORM[arch]}; only models with norm_topk_prob "
                              f"{_TOPK_NORM[arch]} export to GGUF {arch}")
        if cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1:
            raise FormatError(f"{folder}: some layers have a dense MLP (mlp_only_layers / decoder_sparse_step), but "
                              f"llama.cpp's {arch} has experts in every layer; export a model with experts in "
                              "every layer")
    if arch == "gemma3":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(key) is not None:
                raise FormatError(f"{folder}: {key} is {cfg[key]}, but llama.cpp's gemma3 has no soft-capping; "
                                  "only Gemma 3 models without it (all released ones) export to GGUF")


def add_metadata(gguf, writer, cfg: dict, arch: str, name: str) -> None:
    """Add the architecture's keys for the HF config ``cfg`` to ``writer`` (a ``gguf.GGUFWriter`` of ``arch``)."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = rope_parameters(cfg)
    writer.add_name(name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope["rope_theta"] or 10000.0))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(int(_head_dim(cfg) * rope["partial_rotary_factor"]))
    # llama.cpp's default key/value length is hidden / heads (its granite ignores head_dim); Gemma 3 states it always
    # (transformers' loader reads it as head_dim, whose Gemma 3 default is 256). Otherwise written only when it differs,
    # so files of the Llama family stay byte for byte what they were.
    if arch == "gemma3" or (arch != "granite" and _head_dim(cfg) != hidden // heads):
        writer.add_key_length(_head_dim(cfg))
        writer.add_value_length(_head_dim(cfg))
    writer.add_vocab_size(cfg["vocab_size"])
    _add_rope_scaling(gguf, writer, cfg, arch)
    _add_experts(writer, cfg, arch)
    _add_arch_keys(writer, cfg, arch)


def _add_rope_scaling(gguf, writer, cfg: dict, arch: str) -> None:
    rope = rope_parameters(cfg)
    kind = rope["rope_type"]
    if kind == "default" or (kind == "llama3" and arch in ("llama", "granite")):
        return  # llama3: the rope_freqs tensor (rope_tensors)
    if kind == "longrope" and arch == "phi3":
        writer.add_rope_scaling_attn_factors(_longrope_attention_factor(cfg, rope))
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return
    raise FormatError(f"RoPE type {kind!r} is not written for GGUF {arch} by hfquant's exporter; supported: default, "
                      "linear, yarn, llama3 (GGUF llama, granite) and longrope (phi3)")


def _add_experts(writer, cfg: dict, arch: str) -> None:
    count = cfg.get("num_local_experts") or cfg.get("num_experts")
    if not count:
        return
    writer.add_expert_count(count)
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch in _MOE:
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])


def _add_arch_keys(writer, cfg: dict, arch: str) -> None:
    """The keys only one architecture has: Granite's multipliers, Gemma 3's and Phi-3's sliding window."""
    if arch == "granite":  # llama.cpp writes each when set (non-zero)
        for key, add in (("attention_multiplier", writer.add_attention_scale),
                         ("embedding_multiplier", writer.add_embedding_scale),
                         ("residual_multiplier", writer.add_residual_scale),
                         ("logits_scaling", writer.add_logit_scale)):
            if cfg.get(key):
                add(float(cfg[key]))
    elif arch == "gemma3":
        if cfg.get("sliding_window") is not None:
            writer.add_sliding_window(cfg["sliding_window"])
        _warn_gemma3_fixed(cfg)
    elif arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(_original_context(cfg))
        writer.add_sliding_window(cfg.get("sliding_window") or 0)  # 0: none (llama.cpp's convention)


def _warn_gemma3_fixed(cfg: dict) -> None:
    """What llama.cpp's gemma3 fixes and a config may set otherwise: warned, the file is still written."""
    layers = cfg["num_hidden_layers"]
    default = ["sliding_attention" if (i + 1) % _GEMMA3_PATTERN else "full_attention" for i in range(layers)]
    local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")
    scalar, head_dim = cfg.get("query_pre_attn_scalar"), _head_dim(cfg)
    if cfg.get("layer_types") not in (None, default):
        logger.warning("GGUF gemma3: llama.cpp makes every %dth layer global; this model's layer_types differ",
                       _GEMMA3_PATTERN)
    if local not in (None, _GEMMA3_LOCAL_THETA):
        logger.warning("GGUF gemma3: llama.cpp's local layers use RoPE base %g; this model's use %g",
                       _GEMMA3_LOCAL_THETA, local)
    if scalar not in (None, head_dim, cfg["hidden_size"] // cfg["num_attention_heads"]):
        logger.warning("GGUF gemma3: llama.cpp scales attention by head_dim (%d); this model's "
                       "query_pre_attn_scalar is %s", head_dim, scalar)


def _original_context(cfg: dict) -> int:
    """Phi-3's pre-training context length (``original_max_position_embeddings``)."""
    return int(rope_parameters(cfg).get("original_max_position_embeddings")
               or cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])


def _longrope_attention_factor(cfg: dict, rope: dict) -> float:
    """The config's longrope attention factor, else llama.cpp's (and transformers') default from the context
    extension ``max_position_embeddings / original_max_position_embeddings``."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = _original_context(cfg)
    scale = cfg["max_position_embeddings"] / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def rope_tensors(cfg: dict, arch: str) -> dict[str, torch.Tensor]:
    """The RoPE scaling llama.cpp reads as float32 tensors, by GGUF name: Llama 3's per-frequency divisors
    (``rope_freqs``) and Phi-3's longrope factors."""
    rope = rope_parameters(cfg)
    if rope["rope_type"] == "llama3" and arch in ("llama", "granite"):
        return {"rope_freqs.weight": llama3_rope_divisors(rope, _head_dim(cfg))}
    if rope["rope_type"] == "longrope" and arch == "phi3":
        return {f"rope_factors_{k}.weight": torch.tensor(rope[f"{k}_factor"], dtype=torch.float32, device="cpu")
                for k in ("long", "short")}
    return {}


def llama3_rope_divisors(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama 3's RoPE scaling as llama.cpp applies it: per rotary frequency, the number the default frequency is
    divided by (1 for short wavelengths, ``factor`` for long ones, a smooth blend between)."""
    theta = float(rope["rope_theta"])
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    context = float(rope["original_max_position_embeddings"])
    freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    wavelength = 2 * math.pi / freq
    blend = (context / wavelength - low) / (high - low)
    divisor = 1 / ((1 - blend) / factor + blend)
    divisor = torch.where(wavelength < context / high, torch.ones_like(divisor), divisor)
    divisor = torch.where(wavelength > context / low, torch.full_like(divisor, factor), divisor)
    return divisor.float()
