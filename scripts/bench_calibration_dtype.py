"""How fast a calibration forward pass runs in each dtype on this CPU: SmolLM2-135M's body on one calibration
batch (8 x 512 tokens), float32 against bfloat16 and float16, natively and with torch restricted to AVX2.

This decides (README, **bf16, fp16 and GPUs**) whether calibration forwards of a bf16 model should run in
bf16 or in float32 on a CPU. ``--isa avx2`` runs the same measurement in a child process with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` -- torch's own code path on an AVX2-only CPU (AMD Zen 2/3,
older Intel), emulated on a newer one; the table says which. Medians of ``--repeats`` runs after a warm-up.

Writes ``OUT/calibration_dtype.json`` and ``.md``; ``--update-benchmarks`` puts the table in BENCHMARKS.md.

Usage: python scripts/bench_calibration_dtype.py --isa native avx2 --out bench --update-benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from timing import ISA_ENV  # noqa: E402 - scripts/ is on sys.path above
DTYPES = ("float32", "bfloat16", "float16")


def measure(model_path: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (8, 512), generator=torch.Generator().manual_seed(0))
    out = {"isa": torch.backends.cpu.get_cpu_capability(),
           "bf16_instructions": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
           "fp16_instructions": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()), "seconds": {}}
    for name in DTYPES:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, name)).eval()
        times = []
        with torch.no_grad():
            model.model(ids[:1, :64])
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.model(ids)
                times.append(time.perf_counter() - t0)
        out["seconds"][name] = sorted(times)[len(times) // 2]
        del model
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    from timing import table_header

    lines = [*table_header(meta),
             "| torch ISA | how | bf16 instructions | float32 (s) | bfloat16 (s) | bf16 vs fp32 | float16 (s) | fp16 vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        how = "native" if r["requested"] == "native" else "emulated (env vars, torch's AVX2 path)"
        lines.append(f"| {r['isa']} | {how} | {'yes' if r['bf16_instructions'] else 'no'} | {s['float32']:.2f} | "
                     f"{s['bfloat16']:.2f} | {s['float32'] / s['bfloat16']:.2f}x | {s['float16']:.2f} | "
                     f"{s['float32'] / s['float16']:.2f}x |")
    lines.append("")
    lines.append("Seconds of one forward pass of the model body on 8 x 512 tokens (median); `x` > 1 means faster "
                 "than float32.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--isa", nargs="*", default=["native", "avx2"], choices=list(ISA_ENV))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--update-benchmarks", action="store_true")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_out:
        Path(args.child_out).write_text(json.dumps(measure(args.model, args.repeats)))
        return
    rows = []
    for isa in args.isa:
        child = args.out / f".calibration_dtype_{isa}.json"
        args.out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--model", args.model, "--repeats", str(args.repeats),
                        "--child-out", str(child)], env={**os.environ, **ISA_ENV[isa]}, check=True)
        rows.append({"requested": isa, **json.loads(child.read_text())})
        child.unlink()
    from timing import run_meta, save_table

    meta = run_meta("bench_calibration_dtype.py", argv)
    save_table(args.out, "calibration_dtype", meta, rows, markdown(rows, meta),
               "calibration-dtype" if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
