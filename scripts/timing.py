"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs (no autograd)."""
    return interleaved_median_seconds({"fn": fn}, repeats, warmup)["fn"]


def interleaved_median_seconds(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """``{name: median wall time}`` of each ``fns[name]()``, the functions taking turns in every repeat, so a
    slow spell of the machine costs all of them alike (no autograd)."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ``--isa avx2``: torch's own code for AVX2-only CPUs (its dispatch level, oneDNN's and MKL's instruction sets) and
# hfquant's AVX2 build and dispatch (``hfquant.kernels.isa``), on a CPU that has more. An emulation: the numbers
# name it as such.
ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                  "MKL_ENABLE_INSTRUCTIONS": "AVX2", "HFQUANT_ISA": "avx2"}}


def rerun_as_isa(isa: str, argv=None) -> bool:
    """For ``--isa avx2`` in the parent process: run this script again (same arguments) in a child with
    ``ISA_ENV[isa]`` and return True (the caller then returns); False where nothing is to be done (``native``, or
    already the child)."""
    import os
    import subprocess
    import sys

    if isa == "native" or os.environ.get("HFQUANT_ISA") == ISA_ENV[isa]["HFQUANT_ISA"]:
        return False
    args = sys.argv[1:] if argv is None else list(argv)
    subprocess.run([sys.executable, sys.argv[0], *args], env={**os.environ, **ISA_ENV[isa]}, check=True)
    return True


def isa_label() -> str:
    """The instruction set the run measured, and whether it was emulated (``ISA_ENV``) or the CPU's own."""
    import os

    from hfquant.kernels.isa import _hardware, cpu_isa

    isa = cpu_isa()
    if os.environ.get("HFQUANT_ISA") and isa != _hardware():
        return f"{isa} (emulated on an {_hardware()} CPU: ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS, hfquant's {isa} build)"
    return f"{isa} (this CPU's own)"


def run_meta(script: str, argv=None) -> dict:
    """The command, machine and versions a benchmark table is stamped with."""
    import os
    import platform
    import sys

    import transformers

    return {
        "command": f"python scripts/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"ISA {torch.backends.cpu.get_cpu_capability()}, hfquant kernels {isa_label()}",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }


def save_table(out, stem: str, meta: dict, rows: list, md: str, marker: str | None = None) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out``, print the table and, with ``marker``, replace
    that marked section of BENCHMARKS.md."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(md)
    print(md)
    if marker is not None:
        from scripts.bench_accuracy import update_benchmarks

        update_benchmarks(md, marker=marker)


def table_header(meta: dict) -> list[str]:
    """The command and machine lines that open a benchmark's markdown table."""
    return [f"Command: `{meta['command']}`  ",
            f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; "
            f"{meta['threads']} threads; {meta['date']}", ""]
