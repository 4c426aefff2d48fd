"""The main job: quantize the SmolLM2-135M reference model offline and show PPL-16K before and after.

Loads ``models/smollm2-135m`` (made by ``prepare_reference_model.py``), quantizes it at load with the
default ``HFQuantConfig()`` (GPTQ W4 g128 sym, calibrated on the bundled WikiText-2 valid text), saves the
checkpoint, reloads it in this process from disk, checks the reloaded logits equal the quantized model's,
and prints a table. Nothing needs the Hub.

Usage:
    python scripts/quantize_reference.py [--model models/smollm2-135m] [--out out/smollm2-135m-gptq-w4g128]
        [--set key=json ...]  [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "smollm2-135m-gptq-w4g128")
    parser.add_argument("--set", nargs="*", default=[], help="HFQuantConfig fields, key=json (e.g. group_size=64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        print(f"error: no model at {args.model}; run: python scripts/prepare_reference_model.py --out models", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        print(f"error: {args.out} exists and is not empty; pass --overwrite or choose another --out", file=sys.stderr)
        return 2
    try:
        fields = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    except ValueError:
        print("error: --set takes key=json pairs, e.g. group_size=64 sym=false", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant
    from hfquant.calibration.data import BUNDLED_EVALUATION
    from hfquant.errors import HFQuantError
    from hfquant.eval import perplexity

    try:
        config = hfquant.HFQuantConfig(**fields)
    except HFQuantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = BUNDLED_EVALUATION.read_text()
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ppl_fp = perplexity(fp, tokenizer, text, seq_len=512, max_windows=32, progress=True)
    del fp

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, dtype=torch.float32)
    seconds = time.perf_counter() - t0
    tmp = args.out.with_name(args.out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)

    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    ids = tokenizer(text[:2000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    ppl_q = perplexity(reloaded, tokenizer, text, seq_len=512, max_windows=32, progress=True)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors")) / 2**20
    print()
    print("| model | PPL-16K | quantization (s) | checkpoint (MiB) |")
    print("|---|---|---|---|")
    print(f"| fp32 | {ppl_fp:.2f} | — | — |")
    print(f"| {config!r} | {ppl_q:.2f} | {seconds:.1f} | {size:.1f} |")
    print(f"\nsaved to {args.out}; reloaded logits identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
