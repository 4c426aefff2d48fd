"""Scale benchmark on SmolLM2-135M GPTQ W4A16 g128: full load vs layer-wise onloading, 1 vs 2 processes.

Every variant is a complete ``hfquant run`` of the recipe (``recipes/smollm2-135m-gptq-w4a16-g128.yaml`` by
default, evaluation switched off so only load + quantize + save is timed) in its own fresh process:

- ``full``: ``from_pretrained`` of the whole float model, then quantize (1 process, ``--threads`` threads);
- ``layerwise-disk``: ``calibration.layerwise: true, activations: disk`` (one float layer at a time,
  hidden states in safetensors files, quantized modules recomputed instead of cached);
- ``layerwise-device``: layer-wise with the hidden states (and cached module outputs) kept in memory;
- ``1proc-1thread`` / ``2proc-1thread``: the full-load run with ``OMP_NUM_THREADS=1`` in one process, and
  under ``accelerate launch --multi_gpu --num_processes 2 --num_cpu_threads_per_process 1`` (torchrun;
  gloo on CPU). ``full`` is the 1 process x 2 threads row, the same cores as 2 processes x 1 thread.

Peak RSS is the process's ``VmHWM`` (``/proc/self/status``); "above baseline" subtracts the RSS measured in
the same process right after importing torch, transformers and hfquant. The run's input checks (tokenizing
the calibration and evaluation text) have their own peak; the high-water mark is then reset (``clear_refs``)
so the "work" columns show the peak of load + quantize + save alone, also above the post-import baseline. Then PPL-16K (bundled WikiText-2
test, 32 x 512 tokens, exact reference kernel) of the full and layer-wise checkpoints, and a tensor-by-tensor
``torch.equal`` comparison of the checkpoints (full vs layer-wise, 1 process vs 2 processes at 1 thread).

Writes ``OUT/scale.json`` and ``OUT/scale.md``; ``--update-benchmarks`` puts the table in BENCHMARKS.md.

Usage:
    python scripts/bench_scale.py --out bench --update-benchmarks   # five GPTQ runs + 2 evaluations (estimate: ~25 min quiet)
    python scripts/bench_scale.py --set calibration.num_samples=16 --variants full layerwise-disk   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

RECIPE = ROOT / "recipes" / "smollm2-135m-gptq-w4a16-g128.yaml"
QUIET_EVAL = ["evaluation.before=false", "evaluation.after=false"]
VARIANTS = {
    "full": [],
    "layerwise-disk": ["calibration.layerwise=true", "calibration.activations=disk"],
    "1proc-1thread": [],
    "2proc-1thread": [],
    "layerwise-device": ["calibration.layerwise=true"],
}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def run_variant(recipe: str, sets: list[str], output: str) -> dict:
    """One ``hfquant run`` in this process; returns its peak RSS and timings (only rank 0 reports)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from hfquant.app import pipeline
    from hfquant.app import recipe as recipes
    from hfquant.app.cli import _distributed

    baseline = _status_kib("VmRSS")
    t0 = time.perf_counter()
    resolved = recipes.load(recipe, sets, output)
    dist = _distributed(False)
    plan = pipeline.plan(resolved, overwrite=True)
    plan_peak = _status_kib("VmHWM")
    # Reset the high-water mark (Linux: "5" > clear_refs) so the work's own peak is seen apart from the checks.
    Path("/proc/self/clear_refs").write_text("5")
    work_start = _status_kib("VmRSS")
    report = pipeline.execute(plan, quiet=True)
    seconds = time.perf_counter() - t0
    work_peak = _status_kib("VmHWM")
    return {"rank": dist.rank, "seconds": seconds, "baseline_mib": baseline / 1024,
            "plan_peak_mib": plan_peak / 1024, "work_start_mib": work_start / 1024, "work_peak_mib": work_peak / 1024,
            "peak_mib": max(plan_peak, work_peak) / 1024, "timings": report.get("timings") if dist.is_main else None,
            "gptq_seconds": report.get("quantization", {}).get("gptq_seconds") if dist.is_main else None,
            "threads": __import__("torch").get_num_threads(), "processes": dist.world}


def perplexity_of(folder: Path, windows: int, seq_len: int = 512) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant  # noqa: F401
    from hfquant.calibration.data import BUNDLED_EVALUATION
    from hfquant.eval import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return perplexity(model, AutoTokenizer.from_pretrained(folder), BUNDLED_EVALUATION.read_text(),
                      seq_len=seq_len, max_windows=windows)


def same_checkpoint(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def _child(args_list: list[str], env: dict, launcher: list[str] | None = None) -> tuple[dict, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = f.name
    cmd = [*(launcher or [sys.executable]), __file__, *args_list, "--variant-out", out_json]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"variant failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    data = json.loads(Path(out_json).read_text())
    os.unlink(out_json)
    return data, wall


def markdown(rows: list[dict], checks: dict, meta: dict) -> str:
    full = next((r for r in rows if r["variant"] == "full"), rows[0])
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; {meta['date']}; "
        f"recipe `{meta['recipe']}`{' with ' + ', '.join(meta['sets']) if meta['sets'] else ''} (evaluation off "
        "while timed). Peak RSS = VmHWM of the run's process; above baseline = minus its RSS after importing "
        "torch, transformers and hfquant.",
        "",
        "| variant | processes x threads | wall time (s) | vs full | GPTQ solves (s) | rest of quantization (s) | "
        "peak RSS (MiB) | vs full | above baseline (MiB) | vs full | work peak above baseline (MiB) | vs full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r.get("gptq_seconds") or {}
        split = f"{g['solve']:.1f} | {g['other']:.1f}" if g else "— | —"
        if r.get("peak_mib") is None:
            lines.append(f"| {r['variant']} | {r['processes']} x {r['threads']} | {r['wall']:.1f} | "
                         f"{r['wall'] / full['wall']:.2f}x | {split} | — | — | — | — | — | — |")
            continue
        delta, full_delta = r["peak_mib"] - r["baseline_mib"], full["peak_mib"] - full["baseline_mib"]
        work, full_work = r["work_peak_mib"] - r["baseline_mib"], full["work_peak_mib"] - full["baseline_mib"]
        lines.append(f"| {r['variant']} | {r['processes']} x {r['threads']} | {r['wall']:.1f} | "
                     f"{r['wall'] / full['wall']:.2f}x | {split} | {r['peak_mib']:.0f} | {r['peak_mib'] / full['peak_mib']:.1%} | "
                     f"{delta:.0f} | {delta / full_delta:.1%} | {work:.0f} | {work / full_work:.1%} |")
    one = next((r for r in rows if r["variant"] == "1proc-1thread"), None)
    two = next((r for r in rows if r["variant"] == "2proc-1thread"), None)
    if one and two:
        lines.append("")
        lines.append(f"2 processes x 1 thread against 1 process x 1 thread: wall time {one['wall'] / two['wall']:.2f}x faster"
                     + (f"; GPTQ solves {one['gptq_seconds']['solve'] / two['gptq_seconds']['solve']:.2f}x, rest of "
                        f"quantization {one['gptq_seconds']['other'] / two['gptq_seconds']['other']:.2f}x"
                        if one.get("gptq_seconds") and two.get("gptq_seconds") else "") + " (rank 0's own timings).")
    lines.append("")
    for key, value in checks.items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--set", action="append", default=[], help="recipe override, as `hfquant run --set`")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the single-process rows")
    parser.add_argument("--windows", type=int, default=32, help="PPL windows of 512 tokens (32 = PPL-16K)")
    parser.add_argument("--ppl-seq-len", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--work", type=Path, help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="with --work: reuse variants already measured there")
    parser.add_argument("--update-benchmarks", action="store_true")
    parser.add_argument("--variant-sets", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--variant-output", help=argparse.SUPPRESS)
    parser.add_argument("--variant-out", help=argparse.SUPPRESS)
    parser.add_argument("--ppl-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.variant_out and args.ppl_of:
        Path(args.variant_out).write_text(json.dumps({"ppl": perplexity_of(Path(args.ppl_of), args.windows,
                                                                           args.ppl_seq_len)}))
        return
    if args.variant_out:
        result = run_variant(args.recipe, args.variant_sets or [], args.variant_output)
        if result["rank"] == 0:
            Path(args.variant_out).write_text(json.dumps(result))
        return

    # Build hfquant's CPU kernels first (once per environment, in hfquant's own folder) so no timed run compiles them.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-c", "from hfquant.kernels.cpu_ext import extension; extension()"], env=env,
                   check=True)
    work_tmp = None if args.work else tempfile.TemporaryDirectory(prefix="hfquant-bench-scale-")
    work = args.work or Path(work_tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        saved = work / f"{name}.json"
        if args.reuse and saved.is_file() and (work / name / "model.safetensors").is_file():
            rows.append(json.loads(saved.read_text()))
            print(f"{name}: reused {saved}", flush=True)
            continue
        sets = [*args.set, *QUIET_EVAL, *VARIANTS[name]]
        child = ["--recipe", args.recipe, "--variant-output", str(work / name), "--variant-sets", *sets]
        launcher = None
        threads = args.threads
        if name.startswith("2proc"):
            launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                        "--num_cpu_threads_per_process", "1"]
            threads = 1
        elif name.startswith("1proc"):
            threads = 1
        data, wall = _child(child, {**env, "OMP_NUM_THREADS": str(threads)}, launcher)
        row = {"variant": name, "wall": wall, **data}
        if launcher:  # rank 0's peak is one process of two; the table shows wall time only
            row["peak_mib"] = None
        rows.append(row)
        saved.write_text(json.dumps(row))
        print(f"{name}: wall {wall:.1f}s, peak RSS {data['peak_mib']:.0f} MiB (baseline {data['baseline_mib']:.0f}, "
              f"checks {data['plan_peak_mib']:.0f}, work {data['work_peak_mib']:.0f} MiB), "
              f"{data['processes']} x {data['threads']}", flush=True)

    checks = {}
    done = {r["variant"] for r in rows}
    for lw in ("layerwise-disk", "layerwise-device"):
        if {"full", lw} <= done:
            checks[f"checkpoint {lw} == full (torch.equal, every tensor)"] = same_checkpoint(work / "full", work / lw)
    if {"1proc-1thread", "2proc-1thread"} <= done:
        checks["checkpoint 2 processes x 1 thread == 1 process x 1 thread (torch.equal, every tensor)"] = \
            same_checkpoint(work / "1proc-1thread", work / "2proc-1thread")
    for name in ("full", "layerwise-disk"):
        if name in done:
            data, _ = _child(["--ppl-of", str(work / name), "--windows", str(args.windows),
                              "--ppl-seq-len", str(args.ppl_seq_len)],
                             {**env, "HFQUANT_KERNEL": "reference"})
            checks[f"PPL-{args.windows * args.ppl_seq_len // 1024}K of {name} (reference kernel)"] = f"{data['ppl']:.4f}"
    for k, v in checks.items():
        print(f"{k}: {v}", flush=True)

    from timing import run_meta

    meta = {**run_meta("bench_scale.py", argv), "recipe": os.path.relpath(args.recipe, ROOT), "sets": args.set}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=2))
    md = markdown(rows, checks, meta)
    (args.out / "scale.md").write_text(md)
    print(md)
    if args.update_benchmarks:
        from bench_accuracy import update_benchmarks

        update_benchmarks(md, marker="scale")
    if work_tmp is not None:
        work_tmp.cleanup()


if __name__ == "__main__":
    main()
