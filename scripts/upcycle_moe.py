"""Upcycle SmolLM2-135M into a Mixture-of-Experts checkpoint (offline): the MoE model of ``bench_moe.py``.

Every decoder layer keeps SmolLM2's attention and norms exactly; its MLP becomes ``--experts`` experts (default 8), each
a copy of that layer's MLP plus independent Gaussian noise (``--noise``: standard deviation as a fraction of each
weight tensor's own standard deviation, default 0.01; seeded by ``--seed``), and a router that sends each token to
``--top-k`` of them (default 2; the top-k probabilities renormalised to sum to 1, so a near-copy mixture stays close
to the dense MLP).

Router: one ``[experts, hidden]`` matrix per layer, random directions (seeded) made orthogonal to the mean of that
layer's MLP inputs and scaled so that every expert's logit has standard deviation ``--router-std`` (default 1.0). The
mean and covariance come from the dense model on ``--router-windows`` windows of 512 tokens of WikiText-2 ``valid.txt``
(the calibration text, never the test text). Each expert's logit then has mean 0 and the same spread over those
tokens, so no expert is favoured or starved (plain small random weights are not enough: the mean hidden state is far
from zero, and the expert it points to would take most tokens), while the choice still depends on the token.

Architectures (``--arch``):
* ``mixtral`` (the default): ``MixtralForCausalLM``; its attention is Llama's (same RoPE, RMSNorm, GQA, head_dim 64,
  no sliding window, tied embeddings), so with ``--noise 0`` the MoE's logits equal SmolLM2's up to float rounding.
* ``qwen3_moe``: ``Qwen3MoeForCausalLM``. Qwen3 applies an RMSNorm over each head's query and key (``q_norm``,
  ``k_norm``) which SmolLM2 lacks; no weight makes it the identity (it divides by every token's own RMS), so the
  attention is only approximated: the norm weights are set to the mean per-head RMS of q and k on the router windows.
  The script prints the measured gap; it is not SmolLM2's attention.

``save_pretrained`` writes safetensors; transformers 5 saves Mixtral experts in the Hub's per-expert layout
(``block_sparse_moe.experts.N.w1/w2/w3``) and fuses them again on load (``mlp.experts.gate_up_proj`` [E, 2I, H],
gate rows then up rows; ``down_proj`` [E, H, I]). SmolLM2's tokenizer files and generation config are copied, and
``upcycle.json`` records the settings and the numbers printed.

Printed: the max |logit| gap to SmolLM2 on one 128-token window, PPL-16K (WikiText-2 test, 32 windows of 512 tokens,
the project's protocol: ``hfquant.eval.perplexity``) of the dense model and of the MoE, tokens per expert on those
windows (min / median / max over every layer's experts) and parameter counts.

Usage:
    python scripts/upcycle_moe.py                        # models/smollm2-moe-8x, 8 experts, top-2
    python scripts/upcycle_moe.py --experts 4 --out models/smollm2-moe-4x --windows 4
    python scripts/upcycle_moe.py --noise 0 --experts 2 --out /tmp/moe-exact --windows 2   # the exactness check
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)
from transformers.initialization import no_init_weights

from hfquant.calibration.data import BUNDLED_EVALUATION, calibration_windows
from hfquant.eval import perplexity

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("mixtral", "qwen3_moe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def num_experts(config) -> int:
    """The expert count of a Mixtral (``num_local_experts``) or Qwen3-MoE (``num_experts``) config."""
    return getattr(config, "num_local_experts", None) or config.num_experts


class RoutingCounter:
    """Tokens routed to each expert of each MoE layer while the block runs: forward hooks on the routers (the modules
    named ``*.mlp.gate``; their output is ``(logits, scores, indices)`` in transformers 5, or logits for a plain
    Linear router, then ranked with the config's top-k). ``counts``: ``[layers, experts]``; one token counts once
    for each of its top-k experts."""

    def __init__(self, model):
        self.experts, self.top_k = num_experts(model.config), model.config.num_experts_per_tok
        self.routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        self.counts = torch.zeros(len(self.routers), self.experts, dtype=torch.long)
        self.handles = []

    def __enter__(self):
        for i, module in enumerate(self.routers):
            self.handles.append(module.register_forward_hook(functools.partial(self._hook, i)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, i, module, args, output):
        index = output[2] if isinstance(output, tuple) else output.topk(self.top_k, dim=-1).indices
        self.counts[i] += torch.bincount(index.reshape(-1).cpu(), minlength=self.experts)


def routing_summary(counts: torch.Tensor, top_k: int) -> dict:
    """Min / median / max tokens per expert over every (layer, expert), the uniform share (tokens x top-k / experts),
    the experts that got none, and the per-layer counts."""
    flat = counts.reshape(-1).tolist()
    tokens = int(counts[0].sum()) // top_k if counts.numel() else 0
    return {"min": min(flat), "median": statistics.median(flat), "max": max(flat),
            "uniform": tokens * top_k / counts.shape[1], "tokens": tokens,
            "experts_with_no_tokens": sum(1 for c in flat if c == 0), "per_layer": counts.tolist()}


def routing_words(summary: dict) -> str:
    """One line: ``min / median / max (uniform share)``."""
    return (f"{summary['min']} / {summary['median']:.0f} / {summary['max']} "
            f"(uniform {summary['uniform']:.0f}; {summary['experts_with_no_tokens']} experts with none)")


def param_counts(model) -> dict:
    """Parameters (tied ones once), those in the experts, and the active ones per token (all but the experts, plus
    top-k / experts of them)."""
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        experts += p.numel() if ".experts." in name else 0
    counts = {"total": total, "experts": experts, "active_per_token": total}
    if experts:
        counts["active_per_token"] = total - experts + experts * model.config.num_experts_per_tok // num_experts(model.config)
    return counts


def moe_config(dense, arch: str, experts: int, top_k: int):
    """The MoE config with SmolLM2's (Llama) attention settings; refuses a dense config it cannot copy."""
    d = dense.config
    if getattr(d, "attention_bias", False) or getattr(d, "mlp_bias", False) or d.hidden_act != "silu":
        sys.exit("error: the dense model has biases or a non-SiLU MLP; only bias-free SwiGLU Llama models upcycle here")
    common = dict(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                  num_hidden_layers=d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
                  num_key_value_heads=d.num_key_value_heads, head_dim=d.head_dim, hidden_act=d.hidden_act,
                  max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
                  rope_parameters=dict(d.rope_parameters), tie_word_embeddings=d.tie_word_embeddings,
                  bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id,
                  initializer_range=d.initializer_range, attention_dropout=0.0, sliding_window=None,
                  num_experts_per_tok=top_k)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=experts)
    return Qwen3MoeConfig(**common, moe_intermediate_size=d.intermediate_size, num_experts=experts,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                          attention_bias=False)


@torch.no_grad()
def dense_statistics(dense, windows: torch.Tensor) -> list[dict]:
    """Per layer: mean and covariance of the MLP inputs, and the mean per-head RMS of q and k (before RoPE), over
    ``windows`` run through the dense model one at a time."""
    hidden, head_dim = dense.config.hidden_size, dense.config.head_dim
    acc = [{"n": 0, "sum": torch.zeros(hidden, dtype=torch.float64),
            "outer": torch.zeros(hidden, hidden, dtype=torch.float64), "q": [0.0, 0], "k": [0.0, 0]}
           for _ in dense.model.layers]

    def mlp_input(i, module, args):
        x = args[0].reshape(-1, hidden).double()
        acc[i]["n"] += x.shape[0]
        acc[i]["sum"] += x.sum(0)
        acc[i]["outer"] += x.T @ x

    def head_rms(i, key, module, args, out):
        rms = out.reshape(-1, head_dim).double().pow(2).mean(-1).sqrt()
        acc[i][key][0] += float(rms.sum())
        acc[i][key][1] += rms.numel()

    handles = []
    for i, layer in enumerate(dense.model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(functools.partial(mlp_input, i)))
        handles.append(layer.self_attn.q_proj.register_forward_hook(functools.partial(head_rms, i, "q")))
        handles.append(layer.self_attn.k_proj.register_forward_hook(functools.partial(head_rms, i, "k")))
    try:
        for window in windows:
            dense(input_ids=window.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    stats = []
    for a in acc:
        mean = a["sum"] / a["n"]
        stats.append({"mean": mean, "cov": a["outer"] / a["n"] - torch.outer(mean, mean),
                      "q_rms": a["q"][0] / a["q"][1], "k_rms": a["k"][0] / a["k"][1]})
    return stats


def router_weight(stats: dict, experts: int, logit_std: float, gen: torch.Generator) -> torch.Tensor:
    """``[experts, hidden]``: random directions orthogonal to the mean MLP input, each scaled so that its logit has
    standard deviation ``logit_std`` over the statistics' tokens (mean 0: no expert is favoured)."""
    mean, cov = stats["mean"], stats["cov"]
    g = torch.randn(experts, mean.numel(), generator=gen, dtype=torch.float64)
    unit = mean / mean.norm()
    g -= (g @ unit)[:, None] * unit
    spread = ((g @ cov) * g).sum(-1).clamp_min(1e-30).sqrt()
    return (g * (logit_std / spread)[:, None]).float()


def expert_weights(mlp, experts: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and ``down_proj`` [E, H, I]: copies of a Llama MLP, each
    with independent N(0, (noise * std(weight))^2) noise."""
    def copies(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float()
        jitter = torch.randn(experts, *w.shape, generator=gen) * (noise * float(w.std()))
        return w.unsqueeze(0) + jitter
    return torch.cat([copies(mlp.gate_proj.weight), copies(mlp.up_proj.weight)], dim=1), copies(mlp.down_proj.weight)


def moe_state_dict(dense, stats: list[dict], args) -> dict:
    """The MoE's tensors: embedding, final norm and attention copied; experts and routers made here; Qwen3's q/k norms
    set to the mean head RMS."""
    gen = torch.Generator().manual_seed(args.seed)
    sd = {"model.embed_tokens.weight": dense.model.embed_tokens.weight.detach(),
          "model.norm.weight": dense.model.norm.weight.detach()}
    if not dense.config.tie_word_embeddings:
        sd["lm_head.weight"] = dense.lm_head.weight.detach()
    for i, layer in enumerate(dense.model.layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}self_attn.{name}.weight"] = getattr(layer.self_attn, name).weight.detach()
        sd[p + "input_layernorm.weight"] = layer.input_layernorm.weight.detach()
        sd[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach()
        sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"] = expert_weights(
            layer.mlp, args.experts, args.noise, gen)
        sd[p + "mlp.gate.weight"] = router_weight(stats[i], args.experts, args.router_std, gen)
        if args.arch == "qwen3_moe":
            head_dim = dense.config.head_dim
            sd[p + "self_attn.q_norm.weight"] = torch.full((head_dim,), stats[i]["q_rms"])
            sd[p + "self_attn.k_norm.weight"] = torch.full((head_dim,), stats[i]["k_rms"])
    return sd


def build_moe(dense, stats: list[dict], args):
    """The MoE model (float32) holding ``moe_state_dict``; every parameter is set (checked)."""
    config = moe_config(dense, args.arch, args.experts, args.top_k)
    cls = MixtralForCausalLM if args.arch == "mixtral" else Qwen3MoeForCausalLM
    with no_init_weights():  # every weight is overwritten below
        model = cls(config).float()
    missing, unexpected = model.load_state_dict(moe_state_dict(dense, stats, args), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    model.tie_weights()  # no_init_weights skips post_init's tying
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"upcycling left parameters unset: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the embedding")
    model.generation_config = dense.generation_config
    return model.eval()


@torch.no_grad()
def logit_gap(dense, moe, ids: torch.Tensor) -> float:
    """Max |logit difference| between the two models on one window."""
    return float((dense(input_ids=ids).logits - moe(input_ids=ids).logits).abs().max())


def save(moe, dense_path: Path, out: Path) -> None:
    """``save_pretrained`` (safetensors) plus the dense model's tokenizer files and generation config."""
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (dense_path / name).is_file():
            shutil.copy2(dense_path / name, out / name)


def evaluate(dense, moe, tokenizer, windows: int) -> dict:
    """PPL-16K of both models on WikiText-2 test and the MoE's routing on those windows."""
    text = BUNDLED_EVALUATION.read_text()
    result = {"ppl16k_dense": perplexity(dense, tokenizer, text, seq_len=512, max_windows=windows)}
    with RoutingCounter(moe) as counter:
        result["ppl16k_moe"] = perplexity(moe, tokenizer, text, seq_len=512, max_windows=windows)
    result["routing"] = routing_summary(counter.counts, moe.config.num_experts_per_tok)
    return result


def report(result: dict, args) -> str:
    """The printed summary (markdown)."""
    d, m = result["params_dense"], result["params_moe"]
    r = result["routing"]
    lines = [f"Upcycled {args.model} -> {args.out}: {args.arch}, {args.experts} experts, top-{args.top_k}, "
             f"noise {args.noise} x std, router logit std {args.router_std}, seed {args.seed}", "",
             "| model | parameters | active per token | PPL-16K WikiText-2 |", "|---|---|---|---|",
             f"| dense | {d['total'] / 1e6:.1f} M | {d['total'] / 1e6:.1f} M | {result['ppl16k_dense']:.3f} |",
             f"| MoE | {m['total'] / 1e6:.1f} M (experts {m['experts'] / 1e6:.1f} M) | "
             f"{m['active_per_token'] / 1e6:.1f} M | {result['ppl16k_moe']:.3f} |", "",
             f"PPL-16K: first {args.windows} windows of 512 tokens of WikiText-2 test; MoE / dense "
             f"{result['ppl16k_moe'] / result['ppl16k_dense']:.4f}x.",
             f"Max |logit gap| to the dense model on a 128-token window: {result['logit_gap']:.3g}.",
             f"Tokens per expert on those windows, min / median / max over {len(r['per_layer'])} layers x "
             f"{args.experts} experts: {routing_words(r)}.",
             f"Experts implementation (transformers): {result['experts_implementation']}; "
             f"build {result['build_seconds']:.0f} s, save {result['save_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m", help="the dense Llama model")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "smollm2-moe-8x")
    parser.add_argument("--arch", choices=ARCHS, default="mixtral")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.01, help="noise std per expert copy, times each weight's std")
    parser.add_argument("--router-std", type=float, default=1.0, help="standard deviation of every router logit")
    parser.add_argument("--router-windows", type=int, default=8,
                        help="512-token windows of WikiText-2 valid for the router's statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows (PPL-16K: 32)")
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= args.experts:
        parser.error("--top-k must be between 1 and --experts")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        sys.exit(f"error: no model at {args.model}; run: python scripts/prepare_reference_model.py --out models")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    windows = calibration_windows(tokenizer, num_samples=args.router_windows, seq_len=512, seed=args.seed)
    moe = build_moe(dense, dense_statistics(dense, windows), args)
    result = {"build_seconds": time.perf_counter() - t0, "logit_gap": logit_gap(dense, moe, windows[:1, :128]),
              "experts_implementation": moe.config._experts_implementation,
              "params_dense": param_counts(dense), "params_moe": param_counts(moe)}
    t0 = time.perf_counter()
    save(moe, args.model, args.out)
    result["save_seconds"] = time.perf_counter() - t0
    result.update(evaluate(dense, moe, tokenizer, args.windows))
    md = report(result, args)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "upcycle.json").write_text(json.dumps({"settings": settings, **result}, indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
