"""Export the SmolLM2-135M reference to GPTQ and compressed-tensors and check what other readers compute.

Quantizes ``models/smollm2-135m`` (RTN by default: seconds, no calibration), saves it in hfquant's
layout, exports it with ``hfquant.formats.export_checkpoint`` to both formats, then compares on the
first ``--windows`` 512-token windows of WikiText-2 test (the PPL-16K protocol, shortened):

* hfquant model (in memory) -- logits and PPL;
* compressed-tensors export loaded by transformers' own compressed-tensors support in a fresh process
  that never imports hfquant -- max |logit diff| vs hfquant and PPL;
* GPTQ export imported back with ``hfquant.formats.load_gptq`` -- max |logit diff| (float16 scales) and PPL.

Usage:
    python scripts/check_reference_export.py [--set key=json ...] [--windows 4] [--out out/export-check]
e.g. ``--set method='"rtn"' group_size=64`` (default) or ``--set method='"smoothquant"' num_samples=32``.
compressed-tensors needs a group size that divides 576 and 1536 (64 or 32, or -1); g128 is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CT_CHILD = textwrap.dedent("""
    import json, math, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    folder, ids_file, out_file = sys.argv[1:4]
    ids = load_file(ids_file)["ids"]
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    nll, logits = [], []
    with torch.no_grad():
        for w in ids:
            out = m(input_ids=w[None], labels=w[None])
            nll.append(float(out.loss)); logits.append(out.logits[0])
    save_file({"logits": torch.stack(logits).contiguous()}, out_file)
    print(json.dumps({"ppl": math.exp(sum(nll) / len(nll)), "hfquant_imported": "hfquant" in sys.modules}))
""")


def _windows(tokenizer, n: int, seq_len: int = 512):
    from hfquant.calibration.data import BUNDLED_EVALUATION
    from hfquant.eval.perplexity import _ids

    ids = _ids(BUNDLED_EVALUATION.read_text(), tokenizer)
    return ids[: n * seq_len].reshape(n, seq_len)


def _run(model, windows):
    import math

    import torch

    nll, logits = [], []
    with torch.no_grad():
        for w in windows:
            out = model(input_ids=w[None], labels=w[None])
            nll.append(float(out.loss))
            logits.append(out.logits[0])
    return math.exp(sum(nll) / len(nll)), torch.stack(logits)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "export-check")
    parser.add_argument("--set", nargs="*", default=[], help="HFQuantConfig fields, key=json")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--kernel", choices=["reference", "auto"], default="reference",
                        help="hfquant kernel for the in-memory models (HFQUANT_KERNEL): the exact reference by "
                             "default, so the comparison measures the formats, not the CPU int4 kernel's bf16 rounding")
    args = parser.parse_args(argv)
    os.environ["HFQUANT_KERNEL"] = args.kernel
    if not Path(args.model, "config.json").is_file():
        print(f"error: no model at {args.model}; run: python scripts/prepare_reference_model.py --out models", file=sys.stderr)
        return 2
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant import HFQuantConfig
    from hfquant.formats import export_checkpoint, load_gptq

    fields = {"method": "rtn", "group_size": 64}
    fields.update({k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = _windows(tok, args.windows)
    save_file({"ids": windows.contiguous()}, str(args.out / "ids.safetensors"))
    rows = []
    t0 = time.perf_counter()
    fp = AutoModelForCausalLM.from_pretrained(args.model).eval()
    rows.append(("float32", _run(fp, windows)[0], None))
    del fp
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=HFQuantConfig(**fields)).eval()
    print(f"quantized with {model.config.quantization_config!r} in {time.perf_counter() - t0:.1f}s", flush=True)
    ppl, ref = _run(model, windows)
    rows.append(("hfquant", ppl, None))
    model.save_pretrained(args.out / "hfquant")
    scale = float(ref.abs().max())

    formats = ["compressed-tensors"] + ([] if fields.get("method") == "smoothquant" else ["gptq"])
    for fmt in formats:
        dst = export_checkpoint(args.out / "hfquant", fmt, args.out / fmt)
        if fmt == "compressed-tensors":
            proc = subprocess.run([sys.executable, "-c", CT_CHILD, str(dst), str(args.out / "ids.safetensors"),
                                   str(args.out / "ct_logits.safetensors")], capture_output=True, text=True, check=False)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            assert info["hfquant_imported"] is False
            got = load_file(str(args.out / "ct_logits.safetensors"))["logits"]
            rows.append(("compressed-tensors via transformers (no hfquant)", info["ppl"], float((got - ref).abs().max())))
        else:
            ppl_g, got = _run(load_gptq(dst).eval(), windows)
            rows.append(("GPTQ export -> hfquant.formats.load_gptq", ppl_g, float((got - ref).abs().max())))

    print(f"\nSmolLM2-135M, {fields}, {args.windows} x 512 tokens of WikiText-2 test, max |logit| {scale:.2f}")
    print("| model | PPL | max abs logit diff vs hfquant |\n|---|---|---|")
    for name, p, d in rows:
        print(f"| {name} | {p:.4f} | {'' if d is None else f'{d:.3g}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
