"""How much of a quantized model changes when only the float kernels' rounding changes, on the CPU alone.

The GPU check (``tests/test_gpu.py``) compares a run on CUDA with the same run on the CPU. In bf16/fp16 the two
devices' kernels round differently, so later blocks are calibrated on slightly different inputs. This script
measures the size of that effect without a GPU: the same tiny Llama, the same calibration windows and config,
quantized twice on the CPU, once with the ``sdpa`` attention kernel and once with ``eager`` (the same math,
rounded differently). It reports the share of codes that are equal (all modules, within one step, the first
module), the relative logit difference between the two quantized models, and each one's error against its own
float model.

Usage: python scripts/check_kernel_noise.py --out bench/kernel-noise
Writes OUT/kernel_noise.json and OUT/kernel_noise.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/kernel-noise"))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)

    from test_gpu import CASES, compare

    rows = []
    lines = ["| dtype | case | codes equal | within one step | first module equal | logits rel. diff | "
             "error vs float (sdpa / eager) |", "|---|---|---|---|---|---|---|"]
    for name in args.dtypes:
        for case in CASES:
            r = compare(getattr(torch, name), case, run=("cpu", "sdpa"), reference=("cpu", "eager"))
            rows.append({"dtype": name, "case": case, **r})
            lines.append(f"| {name} | {case} | {r['same']:.2%} | {r['within_one']:.2%} | {r['first']:.2%} | "
                         f"{r['logits']:.4f} | {r['err']:.4f} / {r['err_reference']:.4f} |")
            print(lines[-1], flush=True)
    md = "\n".join(lines) + (f"\n\nMachine: CPU, ISA {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}."
                             f" Command: `python scripts/check_kernel_noise.py "
                             f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_noise.json").write_text(json.dumps(rows, indent=2))
    (args.out / "kernel_noise.md").write_text(md)
    return rows


if __name__ == "__main__":
    main()
