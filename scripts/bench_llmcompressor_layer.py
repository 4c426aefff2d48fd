"""llm-compressor's GPTQ on the same Llama-3-8B-shaped layer as ``bench_gpu_layer.py``, for the side-by-side.

The same model (built from the same config with the same seed), the same 128 x 2048 calibration windows and the same
two held-out windows as ``bench_gpu_layer.py``; llm-compressor's ``oneshot`` with ``GPTQModifier(scheme="W4A16")``
(int4, symmetric, groups of 128; its default static act-order, block size 128 and 1% dampening, as hfquant's run)
over a DataLoader of those windows. Prints and writes ``OUT/llmcompressor_layer.json`` / ``.md``: seconds for the
whole calibration, and the layer's output error on the held-out windows against the float layer -- the numbers
``bench_gpu_layer.py`` writes for hfquant.

llm-compressor is not a dependency of hfquant: it needs its own environment (it pins transformers <= 5.17). On the
GPU machine, carry its wheels (README, "GPU check"); ``scripts/gpu_check.sh`` runs this when it imports.

Usage: python scripts/bench_llmcompressor_layer.py --out $OUT
Check on a CPU (tiny shapes): python scripts/bench_llmcompressor_layer.py --device cpu --tiny --dtype float32 \\
    --samples 4 --seq-len 64 --out /tmp/llmc_layer
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_gpu_layer import build_layer, layer_output, layer_parser  # noqa: E402


def placeholder_tokenizer():
    """oneshot wants a tokenizer with a dataset, even a DataLoader of token ids it never decodes: a one-word one,
    built in memory (no Hub)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>")


def main(argv=None) -> dict:
    args = layer_parser(__doc__.splitlines()[0]).parse_args(argv)

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, windows, held_out = build_layer(args)  # as bench_gpu_layer.py: the same weights and windows
    config_dir = Path(tempfile.mkdtemp(prefix="llmc-layer-"))  # oneshot reads the model's config from its folder
    model.config.save_pretrained(config_dir)
    model.config.name_or_path = str(config_dir)
    reference = layer_output(model, held_out)
    batches = [{"input_ids": windows[i:i + args.batch_size], "attention_mask": torch.ones_like(windows[i:i + args.batch_size])}
               for i in range(0, args.samples, args.batch_size)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                          actorder="static")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=args.samples,
            max_seq_length=args.seq_len, tokenizer=placeholder_tokenizer())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    output_error = float((layer_output(model, held_out) - reference).norm() / reference.norm())
    result = {"device": torch.cuda.get_device_name() if cuda else args.device, "torch": torch.__version__,
              "llmcompressor": llmcompressor.__version__, "dtype": args.dtype, "tiny": args.tiny,
              "tokens": args.samples * args.seq_len, "batch_size": args.batch_size, "seconds_per_layer": seconds,
              "output_rel_error": output_error,
              "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    md = ("| what | seconds per layer | layer output error (2 held-out windows) |\n|---|---|---|\n"
          f"| llm-compressor {result['llmcompressor']} GPTQ W4A16 (g128, static act-order), Llama-3-8B-shaped layer, "
          f"{result['tokens']} tokens, {args.dtype}, {result['device']} | {seconds:.1f} | {output_error:.4f} |\n\n"
          f"Command: `python scripts/bench_llmcompressor_layer.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llmcompressor_layer.json").write_text(json.dumps(result, indent=2))
    (args.out / "llmcompressor_layer.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
