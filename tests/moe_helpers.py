"""Tiny Mixture-of-Experts configs of every family transformers 5.x ships with fused experts, for offline tests."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import tiny_tokenizer, VOCAB

ATTN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, vocab_size=VOCAB)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "olmoe", "granitemoe")


def moe_config(family: str, experts: int = 4):
    """A 2-layer config of ``family`` with ``experts`` experts, top-2 routing."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=96, num_local_experts=experts, num_experts_per_tok=2, **ATTN)
    if family == "qwen2_moe":  # with its shared expert and the shared expert's gate
        return tf.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                 num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1, **ATTN)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=experts,
                                 num_experts_per_tok=2, head_dim=16, **ATTN)
    if family == "gpt_oss":  # expert biases, interleaved gate/up, clamped SwiGLU, transposed experts
        return tf.GptOssConfig(intermediate_size=64, num_local_experts=experts, num_experts_per_tok=2, head_dim=16,
                               layer_types=["sliding_attention", "full_attention"], sliding_window=32, **ATTN)
    if family == "deepseek_v3":  # dense first layer, shared experts, grouped top-k routing, MLA attention
        return tf.DeepseekV3Config(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=experts,
                                   num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16, **ATTN)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=experts, num_experts_per_tok=2, **ATTN)
    if family == "granitemoe":
        return tf.GraniteMoeConfig(intermediate_size=48, num_local_experts=experts, num_experts_per_tok=2, **ATTN)
    raise ValueError(family)


def save_moe_model(family: str, folder: Path, seed: int = 0, experts: int = 4) -> Path:
    """A seeded tiny MoE of ``family`` saved with the tiny tokenizer. Routers get larger weights than the default
    initialisation so that routing depends on the token (every expert sees some tokens)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(moe_config(family, experts))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and p.shape[0] == experts and "experts" not in name:
                p.normal_(0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
