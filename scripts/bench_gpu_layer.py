"""GPTQ W4 g128 of one decoder layer shaped like Llama-3-8B, on a GPU, with 128 x 2048 calibration tokens.

Model files cannot travel to the GPU machine, so the model is built there from a config with random weights:
Llama-3-8B's layer shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, rope theta 500000), one decoder
layer, a 32000-token vocabulary (the embedding only feeds the layer). Calibration is 128 random windows of
2048 tokens, in batches of ``--batch-size``; the time is ``hfquant.quantize_`` of the whole (one-layer) model:
capture, forward passes, Hessians, the seven GPTQ solves (act-order, static groups, true-sequential). The
number to compare is seconds per layer against llm-compressor's published 745 s for the whole Llama-3-8B
(32 layers) on one GPU, 23.3 s per layer.

Writes ``OUT/gpu_layer[-minmax].json`` and ``.md``.

Usage (GPU machine): python scripts/bench_gpu_layer.py --out $OUT
Check on a CPU (tiny shapes): python scripts/bench_gpu_layer.py --device cpu --tiny --out /tmp/gpu_layer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLM_COMPRESSOR_SECONDS, LLAMA3_8B_LAYERS = 745.0, 32


def llama3_8b_layer_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=1, vocab_size=512, max_position_embeddings=2048)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=1, vocab_size=32000, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5)


def layer_output(model, ids: torch.Tensor) -> torch.Tensor:
    """The one decoder layer's output (``hidden_states[1]``, with the final norm where the model applies it there),
    float32, for windows ``ids``: the number to compare between quantizers of the same layer."""
    with torch.no_grad():
        out = model.model(ids.to(model.device), output_hidden_states=True)
    return out.hidden_states[1].float()


def layer_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every script timing GPTQ on this layer takes (this one and bench_llmcompressor_layer.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    parser.add_argument("--out", type=Path, default=Path("bench/gpu"))
    return parser


def build_layer(args):
    """``(model, windows, held_out)``: the one-layer model (seeded: the same weights in every script), the calibration
    windows and two held-out windows (one seeded generator)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(llama3_8b_layer_config(args.tiny), dtype=getattr(torch, args.dtype))
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=gen)
    held_out = torch.randint(0, model.config.vocab_size, (2, args.seq_len), generator=gen)
    return model.eval(), windows, held_out


def main(argv=None) -> dict:
    parser = layer_parser(__doc__.splitlines()[0])
    parser.add_argument("--observer", choices=["hessian", "minmax"], default="hessian",
                        help="group grids: hessian (hfquant's default) or minmax (llm-compressor's default)")
    parser.add_argument("--loop", choices=["auto", "fused", "torch"], default="auto",
                        help="GPTQ's column loop (HFQUANT_GPTQ_LOOP): fused Triton kernel (the default on CUDA) or PyTorch")
    args = parser.parse_args(argv)

    import hfquant
    from hfquant.core.gptq import COLUMN_LOOP_ENV

    os.environ[COLUMN_LOOP_ENV] = args.loop
    model, windows, held_out = build_layer(args)
    config = hfquant.HFQuantConfig(bits=4, group_size=128, sym=True, desc_act=True, static_groups=True,
                                   observer=args.observer,
                                   num_samples=args.samples, seq_len=args.seq_len,
                                   calibration_batch_size=args.batch_size)
    reference = layer_output(model, held_out)  # the float layer's output on windows not calibrated on
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = hfquant.quantize_(model, config, windows=windows, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = layer_output(model, held_out)
    output_error = float((out - reference).norm() / reference.norm())
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__, "dtype": args.dtype, "observer": args.observer, "loop": args.loop,
        "tiny": args.tiny,
        "tokens": args.samples * args.seq_len, "batch_size": args.batch_size,
        "seconds_per_layer": seconds, "gptq_seconds": report.get("gptq_seconds"),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
        "llm_compressor_seconds_per_layer": LLM_COMPRESSOR_SECONDS / LLAMA3_8B_LAYERS,
        "modules": len(report["modules"]), "output_rel_error": output_error,
    }
    ratio = result["llm_compressor_seconds_per_layer"] / seconds
    md = ("| what | seconds per layer |\n|---|---|\n"
          f"| hfquant GPTQ W4 g128, Llama-3-8B-shaped layer, {result['tokens']} tokens, {args.dtype}, loop {args.loop}, "
          f"{result['device']} | {seconds:.1f} (solves {result['gptq_seconds']['solve']:.1f}) |\n"
          f"| llm-compressor, published: 745 s / 32 layers (their GPU, their run) | "
          f"{result['llm_compressor_seconds_per_layer']:.1f} |\n\n"
          f"Ratio (published / measured): {ratio:.2f}x. The layer's output on 2 held-out windows: "
          f"{output_error:.4f} relative error against the float layer. Peak GPU memory: "
          f"{result['peak_gpu_gib'] or 0:.1f} GiB. Command: `python scripts/bench_gpu_layer.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_layer" + ("" if args.observer == "hessian" else f"-{args.observer}") + (
        "" if args.loop == "auto" else f"-{args.loop}")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
