"""Load hfquant's GPTQ export through transformers' own GPTQ path (optimum + gptqmodel) and compare logits.

gptqmodel is too heavy for CI (it declares torch>=2.14.1 and CUDA wheels), so it lives in a separate
venv made by ``scripts/setup_gptq_venv.sh`` (``.venv-gptq``, git-ignored); this script runs in the
project's venv (with hfquant) and starts the other venv's Python (without hfquant) for the load.

Cases: tiny Llama (hidden 128, groups of 32; gptqmodel's CPU kernel needs out_features % 32 == 0) sym with act-order g_idx, tiny Llama asym, and with
``--reference`` SmolLM2-135M RTN W4 sym with g64 and g128 (576 columns: g128 has a partial last group
of 64, which gptqmodel's kernels refuse: ``in_features % group_size`` must be 0).
For each: hfquant logits, hfquant logits with scales/biases rounded to float16 (what the GPTQ file
stores), and transformers+gptqmodel logits on the same ids; prints max |diff|.

Usage:
    bash scripts/setup_gptq_venv.sh
    python scripts/check_gptq_interop.py [--gptq-python .venv-gptq/bin/python] [--reference]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    assert "hfquant" not in sys.modules
    for folder in json.loads(sys.argv[1]):
        ids = load_file(folder + ".ids.safetensors")["ids"]
        try:
            m = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
        except Exception as e:
            print("FAILED", folder, type(e).__name__, str(e).splitlines()[0][:300], flush=True)
            continue
        kinds = sorted({type(x).__name__ for x in m.modules() if "QuantLinear" in type(x).__name__ or "Linear" in type(x).__name__})
        with torch.no_grad():
            out = m(input_ids=ids).logits.float()
        save_file({"logits": out.contiguous()}, folder + ".gptqmodel.safetensors")
        print("LOADED", folder, kinds, flush=True)
""")


def _tiny(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import (  # the tests' offline byte-level BPE (trained in a second)
        VOCAB,
        tiny_tokenizer,
    )

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB, tie_word_embeddings=True)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptq-python", default=str(ROOT / ".venv-gptq" / "bin" / "python"))
    parser.add_argument("--reference", action="store_true", help="also SmolLM2-135M (models/smollm2-135m)")
    parser.add_argument("--kernel", choices=["reference", "auto"], default="reference",
                        help="hfquant kernel for its side of the comparison (HFQUANT_KERNEL); the exact reference "
                             "by default, so the comparison measures the format, not the CPU int4 kernel's bf16 rounding")
    args = parser.parse_args(argv)
    os.environ["HFQUANT_KERNEL"] = args.kernel
    if not Path(args.gptq_python).is_file():
        print(f"error: no {args.gptq_python}; run: bash scripts/setup_gptq_venv.sh", file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig
    from hfquant.formats import export_checkpoint
    from hfquant.formats.gptq import float16_rounded

    work = Path(tempfile.mkdtemp(prefix="gptq-interop-"))
    tiny = _tiny(work / "tiny-fp")
    cases = {
        # act-order without static groups: non-monotone g_idx (GPTQ on the bundled calibration text)
        "tiny-gptq-actorder-sym-g32": (tiny, {"group_size": 32, "desc_act": True, "static_groups": False, "num_samples": 8, "seq_len": 64, "calibration_batch_size": 4}),
        "tiny-rtn-asym-g32": (tiny, {"method": "rtn", "group_size": 32, "sym": False}),
    }
    if args.reference:
        ref = ROOT / "models" / "smollm2-135m"
        cases["smollm2-rtn-sym-g64"] = (ref, {"method": "rtn", "group_size": 64})
        cases["smollm2-rtn-sym-g128"] = (ref, {"method": "rtn", "group_size": 128})  # partial group: gptqmodel refuses
    gen = torch.Generator().manual_seed(0)
    refs = {}
    for name, (src, kw) in cases.items():
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=HFQuantConfig(**kw)).eval()
        vocab = model.config.vocab_size
        ids = torch.randint(0, min(vocab, 320), (2, 32), generator=gen)
        model.save_pretrained(work / f"{name}-hfquant")
        folder = export_checkpoint(work / f"{name}-hfquant", "gptq", work / name)
        save_file({"ids": ids}, f"{folder}.ids.safetensors")
        with torch.no_grad():
            refs[name] = (model(input_ids=ids).logits, float16_rounded(model)(input_ids=ids).logits)
        del model
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([args.gptq_python, "-c", CHILD, json.dumps([str(work / n) for n in cases])],
                          capture_output=True, text=True, env=env, check=False)
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("LOADED", "FAILED"))))
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
    print("| case | max abs logit | gptqmodel vs hfquant | gptqmodel vs hfquant (fp16 scales) |\n|---|---|---|---|")
    for name in cases:
        out = Path(f"{work / name}.gptqmodel.safetensors")
        ref, rounded = refs[name]
        if not out.is_file():
            print(f"| {name} | {float(ref.abs().max()):.3g} | not loaded | not loaded |")
            continue
        got = load_file(str(out))["logits"]
        print(f"| {name} | {float(ref.abs().max()):.3g} | {float((got - ref).abs().max()):.3g} | {float((got - rounded).abs().max()):.3g} |")
    shutil.rmtree(work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
