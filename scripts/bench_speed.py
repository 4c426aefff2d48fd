"""Speed benchmark on this CPU: per-layer W8A8 / W4A16 vs fp32, and SmolLM2-135M prefill, as ratios from one run.

Per layer: a Llama-7B-like 4096x4096 Linear at M = 1 and 512 rows: fp32 ``F.linear`` vs hfquant's
``QuantLinearW8A8`` (activation quantization included) and ``QuantLinearW4A16`` (dispatched kernel).
End to end: SmolLM2-135M prefill of 1x512 tokens, fp32 vs W8A8 vs W4A16 (median of repeats).

Writes ``OUT/speed.json`` and ``OUT/speed.md``; ``--update-benchmarks`` puts the table in BENCHMARKS.md.

Usage:
    python scripts/bench_speed.py --model models/smollm2-135m --out bench --update-benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def layer_rows(repeats: int) -> list[dict]:
    import torch.nn.functional as F

    from hfquant.algorithms.rtn import rtn_quantize
    from hfquant.nn.w4a16 import QuantLinearW4A16
    from hfquant.nn.w8a8 import QuantLinearW8A8

    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 4096, bias=False)
    w8 = QuantLinearW8A8.from_float(lin, lin.weight.data)
    codes, scales, zeros, g_idx = rtn_quantize(lin.weight.data, 4, 128, True)
    w4 = QuantLinearW4A16.from_float(lin, codes, scales, zeros, g_idx, 4, 128)
    rows = []
    for m in (1, 512):
        x = torch.randn(m, 4096)
        fp = median_ms(lambda: F.linear(x, lin.weight), repeats)
        t8 = median_ms(lambda: w8(x), repeats)
        t4 = median_ms(lambda: w4(x), repeats)
        rows.append({"case": f"Linear 4096x4096, M={m}", "fp32_ms": fp, "w8a8_ms": t8, "w4a16_ms": t4,
                     "w8a8_speedup": fp / t8, "w4a16_speedup": fp / t4})
    return rows


def model_rows(model_path: str, repeats: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig

    ids = torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(0))
    small = dict(num_samples=8, seq_len=128)  # calibration size does not change the kernels' speed
    models = {
        "fp32": AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
        "w8a8": AutoModelForCausalLM.from_pretrained(model_path, quantization_config=HFQuantConfig(
            method="smoothquant", alpha=None, **small)),
        "w4a16-g128": AutoModelForCausalLM.from_pretrained(model_path, quantization_config=HFQuantConfig(
            method="rtn", group_size=128)),
    }
    times = {k: median_ms(lambda m=m: m(input_ids=ids), repeats) for k, m in models.items()}
    return [{"case": "SmolLM2-135M prefill 1x512", "fp32_ms": times["fp32"], "w8a8_ms": times["w8a8"],
             "w4a16_ms": times["w4a16-g128"], "w8a8_speedup": times["fp32"] / times["w8a8"],
             "w4a16_speedup": times["fp32"] / times["w4a16-g128"]}]


def markdown(rows, meta) -> str:
    out = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; torch {meta['torch']}; "
           f"{meta['threads']} threads; median of {meta['repeats']} runs; {meta['date']}", "",
           "| case | fp32 (ms) | W8A8 (ms) | W8A8 speedup | W4A16 (ms) | W4A16 speedup |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['fp32_ms']:.2f} | {r['w8a8_ms']:.2f} | {r['w8a8_speedup']:.2f}x | "
                   f"{r['w4a16_ms']:.2f} | {r['w4a16_speedup']:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--update-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    rows = layer_rows(args.repeats)
    if Path(args.model, "config.json").is_file():
        rows += model_rows(args.model, args.repeats)
    meta = {"command": "python scripts/bench_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = markdown(rows, meta)
    (args.out / "speed.md").write_text(md)
    print(md)
    if args.update_benchmarks:
        from scripts.bench_accuracy import update_benchmarks

        update_benchmarks(md, marker="speed")


if __name__ == "__main__":
    main()
