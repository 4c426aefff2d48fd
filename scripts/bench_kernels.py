"""Kernel benchmark: quantized Linear vs the float baseline at Llama-7B-like shapes, as ratios from one run.

Shapes (in x out): 4096x4096, 4096x11008, 11008x4096, at M = 1, 16, 64, 512 rows. Baseline: float32
``F.linear`` on CPU, bfloat16 ``F.linear`` on CUDA. Candidates: ``QuantLinearWeightOnly`` (4-bit, g128,
through hfquant's dispatch: on CPU hfquant's own kernel for one row, and for more rows the reproducible choice
(hfquant's int16 GEMM where built; ``HFQUANT_CPU_PREFILL=fastest`` times the dequantized tiles, torch's int4 kernel
and the int16 GEMM instead); Triton on CUDA) and ``QuantLinearW8A8``
(per-token int8 activations included: on CPU hfquant's GEMV for one row, and for more rows ``torch._int_mm``
with AVX512-VNNI, else the faster of hfquant's int8 GEMM and float32 tiles; Triton on CUDA). On CPU the table
names the path each cell ran, and has a third candidate: the float32 weight held exactly in bf16
(``HalfStoredLinear``, how a quantized model holds a float32 output head whose values are bf16: hfquant's 16-bit
GEMV up to 16 rows, else float32 tiles converted for torch's GEMM, 32 MB tiles from 256 rows). Bandwidth = bytes of weight operands the kernel reads / time, next to the machine's
copy bandwidth measured in the same run ((read + write) / time of a large ``copy_``).

CPU timing, three protocols (``--cache``); each measures every candidate the same way in one run:

* ``rotate`` (the default): each timed call uses its own copy of the weights, cycling over enough copies
  (>= twice the last-level cache in all) that every call reads its weights from DRAM, while the Python
  interpreter, ``x`` and the output stay in cache. This is decode: every layer's weights are read once per
  token and evicted by the other layers' before they are read again, and the code runs in a hot loop. The
  median is over ``max(--repeats, copies)`` calls. The CUDA protocol below does the same with a graph.
* ``cold``: a buffer of twice the last-level cache is read before every timed call, so the weights *and*
  the interpreter's state, the operand caches and ``x`` come from DRAM. This adds a fixed cost per call
  that is larger for paths with more Python (hfquant's dispatch) than for ``F.linear``.
* ``warm``: back-to-back calls on one copy (weights resident when they fit: this VM's 260 MB L3 holds a
  64 MB float weight, and the float baseline then reads it at cache speed).

CUDA timing: one CUDA graph replays the call over enough copies of the weights (>= 256 MB in all) that the
50 MB L2 cannot serve them; time per call is the median replay time / copies. The graph removes Python
launch overhead, as serving engines do for decode; the eager overhead is not in these numbers.

Writes ``OUT/kernels-<device>[-cold|-warm].json`` and ``.md``; ``--update-benchmarks`` puts the table in
BENCHMARKS.md.

Usage:
    python scripts/bench_kernels.py --out bench --update-benchmarks                 # CPU, rotating copies
    python scripts/bench_kernels.py --out bench --cache cold --update-benchmarks    # CPU, flushed caches
    python scripts/bench_kernels.py --device cuda --out bench                       # GPU
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.timing import median_seconds  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
ROWS = [1, 16, 64, 512]


def last_level_cache_bytes(default: int = 256 << 20) -> int:
    """Size of the largest CPU cache sysfs reports (Linux), else ``default``."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=default)


def cold_median_seconds(fn, repeats: int, flush: torch.Tensor, warmup: int = 2) -> float:
    """Median wall time of one ``fn()`` call, the caches flushed before each by reading ``flush`` (a read
    sweep: a write would leave the cache full of dirty lines whose write-back then competes with the call)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            flush.sum()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rotating_median_ms(make_calls, weight_bytes: int, repeats: int) -> float:
    """CPU: median wall time of one call, cycling over calls that each read their own copy of the weights
    (>= twice the last-level cache in all): every call's weights come from DRAM, as each layer's do once per
    decoded token, while the interpreter, ``x`` and the output stay in cache, as they do in decode."""
    calls = make_calls(max(1, min(64, -(-2 * last_level_cache_bytes() // weight_bytes))))
    with torch.no_grad():
        for fn in calls:  # warm-up: builds each copy's kernel operands
            fn()
        times = []
        for i in range(max(repeats, len(calls))):
            t0 = time.perf_counter()
            calls[i % len(calls)]()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def timer(device: str, repeats: int, cache: str = "warm"):
    """A function ``fn -> median milliseconds`` for the device."""
    if device == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=max(repeats, 20), return_mode="median")
    if cache == "cold":
        flush = torch.ones(2 * last_level_cache_bytes() // 4)
        return lambda fn: cold_median_seconds(fn, repeats, flush) * 1e3
    return lambda fn: median_seconds(fn, repeats, warmup=2) * 1e3


def copy_bandwidth_gbs(device: str, time_ms) -> float:
    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / (time_ms(lambda: b.copy_(a)) * 1e-3) / 1e9


def build(in_f: int, out_f: int, device: str, dtype: torch.dtype):
    from hfquant.core.grids import rtn_quantize
    from hfquant.nn import prepare_model
    from hfquant.nn.weight_only import QuantLinearWeightOnly
    from hfquant.nn.w8a8 import QuantLinearW8A8

    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    codes, scales, zeros, g_idx = rtn_quantize(lin.weight.data, 4, 128, True)
    w4 = QuantLinearWeightOnly.from_float(lin, codes, scales, zeros, g_idx, 4, 128).to(device)
    w8 = QuantLinearW8A8.from_float(lin, lin.weight.data).to(device)
    prepare_model(torch.nn.ModuleList([w4, w8]))
    half = None
    if device == "cpu":  # the float32 weight held in bf16, as a quantized model holds an exact head (same speed for any values)
        from hfquant.nn.half import HalfStoredLinear

        half = HalfStoredLinear(lin.weight.data.to(torch.bfloat16), None, torch.float32)
    return lin.weight.data.to(device=device, dtype=dtype), w4, w8, half


def weight_bytes(in_f: int, out_f: int, device: str, float_bytes: int, m: int) -> dict:
    from hfquant.kernels.weight_only import CPU_GEMV_MAX_ROWS

    groups = -(-in_f // 128)
    # W4A16 operands read per call: packed codes plus per-group scale and zero (CPU, one row: hfquant's kernel,
    # float32 scale and zero; CPU, more rows: torch's int4 kernel, bf16 pairs; Triton: float32 scales and
    # int32 zeros); W8A8: int8 codes and float32 per-channel scales.
    per_group = 4 if device == "cpu" and m > CPU_GEMV_MAX_ROWS else 8
    return {"fp": float_bytes * in_f * out_f, "w4a16": in_f * out_f // 2 + per_group * groups * out_f,
            "w8a8": in_f * out_f + 4 * out_f, "bf16w": 2 * in_f * out_f}


def fresh_copy(module):
    """A copy of a quantized Linear with its own tensors and an empty kernel-operand cache."""
    import copy

    clone = copy.deepcopy(module)
    clone._kernel_cache = {}
    return clone


def graph_time_ms(make_calls, weight_bytes: int) -> tuple[float, int]:
    """CUDA: median time of one call, replayed from a CUDA graph over enough copies of the weights that
    the L2 cache cannot hold them (>= 256 MB in total). Returns (ms per call, copies)."""
    copies = max(1, min(64, -(-(256 << 20) // weight_bytes)))
    calls = make_calls(copies)
    with torch.no_grad():
        for fn in calls:  # warm-up: compiles and autotunes outside the capture
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        times = []
        for _ in range(12):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / copies)
    return statistics.median(times[2:]), copies


def run(device: str, repeats: int, shapes, rows_list, cache: str = "warm") -> tuple[list[dict], float]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    time_ms = timer(device, repeats, cache)
    bw = copy_bandwidth_gbs(device, timer(device, repeats))
    rows = []
    for in_f, out_f in shapes:
        w, w4, w8, half = build(in_f, out_f, device, dtype)
        for m in rows_list:
            nbytes = weight_bytes(in_f, out_f, device, w.element_size(), m)
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            candidates = {"fp": (w, lambda x, w: F.linear(x, w)), "w4a16": (w4, lambda x, mod: mod(x)),
                          "w8a8": (w8, lambda x, mod: mod(x))}
            if half is not None:
                candidates["bf16w"] = (half, lambda x, mod: mod(x))
            if device == "cuda":  # each CUDA path on its own, beside the dispatch's choice (w4a16, w8a8)
                from hfquant.kernels import cuda_paths

                candidates["w4a16_tinygemm"] = (w4, cuda_paths.weight_only_tinygemm)
                candidates["w4a16_triton"] = (w4, cuda_paths._triton_weight_only)
                candidates["w8a8_triton"] = (w8, cuda_paths._triton_w8a8)
                if m > 16:  # cuBLAS int8 GEMM + fused epilogue
                    candidates["w8a8_int_mm"] = (w8, cuda_paths._int_mm_w8a8)
            t = {}
            for name, (obj, call) in candidates.items():
                def make_calls(n, obj=obj, call=call):
                    objs = [obj] + [obj.clone() if isinstance(obj, torch.Tensor) else fresh_copy(obj)
                                    for _ in range(n - 1)]
                    return [lambda o=o: call(x, o) for o in objs]
                if device == "cuda":
                    t[name], copies = graph_time_ms(make_calls, nbytes[name.split("_")[0]])
                elif cache == "rotate":
                    t[name] = rotating_median_ms(make_calls, nbytes[name], repeats)
                else:
                    with torch.no_grad():
                        t[name] = time_ms(lambda obj=obj, call=call: call(x, obj))
            row = {"shape": f"{in_f}x{out_f}", "M": m}
            for k, v in t.items():
                row[f"{k}_ms"] = v
                row[f"{k}_gbs"] = nbytes[k.split("_")[0]] / (v * 1e-3) / 1e9
            row["w4a16_speedup"], row["w8a8_speedup"] = t["fp"] / t["w4a16"], t["fp"] / t["w8a8"]
            if device == "cpu":
                row["w4a16_path"], row["w8a8_path"] = cpu_paths(in_f, out_f, m)
            if "bf16w" in t:
                from hfquant.kernels import half as half_kernels
                from hfquant.kernels.common import remembered_path

                row["bf16w_speedup"] = t["fp"] / t["bf16w"]
                row["bf16w_path"] = remembered_path(half_kernels._CHOICE, (in_f, out_f, m.bit_length()),
                                                    "HFQUANT_CPU_HALF", half_kernels.PATHS) or "?"
            for k in ("w8a8_int_mm", "w8a8_triton", "w4a16_tinygemm", "w4a16_triton"):
                if k in t:
                    row[f"{k}_speedup"] = t["fp"] / t[k]
            if device == "cuda":
                row["w4a16_path"], row["w8a8_path"] = cuda_paths_taken(x, w4, w8)
            rows.append(row)
            print(" ".join(f"{k} {v:.4f} ms ({t['fp'] / v:.2f}x)" for k, v in t.items()), f"| {row['shape']} M={m}",
                  flush=True)
    return rows, bw


def cuda_paths_taken(x: torch.Tensor, w4, w8) -> tuple[str, str]:
    """Which CUDA path hfquant's dispatch chose for W4A16 and W8A8 at this shape and row count."""
    from hfquant.kernels import cuda_paths
    from hfquant.kernels.common import remembered_path

    w4_key = cuda_paths._shape_class(x, w4, 4, w4.group_size)
    w8_key = cuda_paths._shape_class(x, w8, 8, -1)
    return (remembered_path(cuda_paths._W4A16_CHOICE, w4_key, "HFQUANT_CUDA_W4A16", cuda_paths._w4a16_paths()) or "?",
            remembered_path(cuda_paths._W8A8_CHOICE, w8_key, "HFQUANT_CUDA_W8A8", cuda_paths._w8a8_paths()) or "?")


def cpu_paths(in_f: int, out_f: int, m: int) -> tuple[str, str]:
    """Which CPU path hfquant's dispatch ran for W4A16 (g128) and W8A8 at this shape and row count (after the
    timed calls, so the choice is made)."""
    from hfquant.kernels import w8a8, weight_only
    from hfquant.kernels.common import remembered_path
    from hfquant.kernels.isa import int8_gemm_is_fast

    if m <= weight_only.CPU_GEMV_MAX_ROWS:
        w4 = "gemv"
    else:
        w4 = remembered_path(weight_only._PREFILL_CHOICE, (in_f, out_f, 128, 4, m.bit_length()), "HFQUANT_CPU_PREFILL",
                             weight_only._prefill_paths()) or "?"
    if m <= w8a8.CPU_GEMV_MAX_ROWS:
        w8 = "gemv"
    elif int8_gemm_is_fast():
        w8 = "_int_mm"
    else:
        w8 = remembered_path(w8a8._MANY_ROWS_CHOICE, (in_f, out_f, m.bit_length()), "HFQUANT_CPU_W8A8",
                             w8a8._many_rows_paths()) or "?"
    return w4, w8


EACH_PATH = (("w4a16_tinygemm", "W4A16 tinygemm"), ("w4a16_triton", "W4A16 Triton"), ("w8a8_int_mm", "W8A8 via _int_mm"),
             ("w8a8_triton", "W8A8 Triton"))  # CUDA: each path on its own, beside the dispatch's choice


def markdown(rows, meta) -> str:
    base = meta["baseline"]
    each = [(k, title) for k, title in EACH_PATH if any(f"{k}_ms" in r for r in rows)]
    extra_head = "".join(f" {title} (ms) | its speedup |" for _, title in each)
    paths = any("w4a16_path" in r for r in rows)
    path_head = " W4A16 path | W8A8 path |" if paths else ""
    half = any("bf16w_ms" in r for r in rows)
    half_head = " float32 W held in bf16 (ms) | its speedup | its path |" if half else ""
    out = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['timing']}; "
           f"{meta['date']}. Copy bandwidth measured in the same run: {meta['copy_gbs']:.1f} GB/s.", "",
           f"| shape (in x out) | M | {base} (ms) | W4A16 (ms) | W4A16 speedup | W8A8 (ms) | W8A8 speedup |{extra_head} "
           f"{base} GB/s | W4A16 GB/s | W8A8 GB/s |{path_head}{half_head}",
           "|---" * (10 + 2 * len(each) + 2 * paths + 3 * half) + "|"]
    for r in rows:
        extra = "".join(f" {r[k + '_ms']:.4f} | {r[k + '_speedup']:.2f}x |" if f"{k}_ms" in r else " - | - |"
                        for k, _ in each)
        out.append(f"| {r['shape']} | {r['M']} | {r['fp_ms']:.4f} | {r['w4a16_ms']:.4f} | {r['w4a16_speedup']:.2f}x | "
                   f"{r['w8a8_ms']:.4f} | {r['w8a8_speedup']:.2f}x |{extra} {r['fp_gbs']:.0f} | {r['w4a16_gbs']:.0f} | "
                   f"{r['w8a8_gbs']:.0f} |" + (f" {r.get('w4a16_path', '')} | {r.get('w8a8_path', '')} |" if paths else "")
                   + (f" {r['bf16w_ms']:.4f} | {r['bf16w_speedup']:.2f}x | {r['bf16w_path']} |" if half else ""))
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated M values")
    parser.add_argument("--cache", choices=["rotate", "cold", "warm"], default="rotate",
                        help="CPU: cycle over weight copies larger than the cache (rotate, as in decode), flush the "
                             "caches before each call (cold), or repeat one call (warm)")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: run as on an AVX2-only CPU (torch's AVX2 code, hfquant's AVX2 build; emulated)")
    parser.add_argument("--update-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    from scripts.timing import isa_label, rerun_as_isa

    if rerun_as_isa(args.isa, argv):
        return
    rows_list = [int(v) for v in args.rows.split(",")]
    rows, bw = run(args.device, args.repeats, SHAPES, rows_list, args.cache)
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
        timing = "CUDA-graph replay over weight copies (>= 256 MB, L2 defeated), median; bf16 activations"
    else:
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                   f"torch ISA {torch.backends.cpu.get_cpu_capability()}, hfquant kernels {isa_label()}")
        llc = 2 * last_level_cache_bytes() >> 20
        timing = {"rotate": f"median of max({args.repeats}, copies) calls cycling over copies of the weights (>= {llc} "
                            "MB in all: weights come from DRAM, code and activations stay cached)",
                  "cold": f"median of {args.repeats} runs; caches flushed before each call ({llc} MB read: weights, "
                          "code and activations come from DRAM)",
                  "warm": f"median of {args.repeats} runs; warm caches (back-to-back calls)"}[args.cache]
        timing += "; float32 activations"
    meta = {"command": "python scripts/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "torch": torch.__version__, "timing": timing, "copy_gbs": bw,
            "baseline": "bf16" if args.device == "cuda" else "fp32", "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{args.device}" + (f"-{args.cache}" if args.device == "cpu" and args.cache != "rotate" else "")
    stem += f"-{args.isa}" if args.isa != "native" else ""
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = markdown(rows, meta)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    if args.update_benchmarks:
        from scripts.bench_accuracy import update_benchmarks

        update_benchmarks(md, marker=stem)


if __name__ == "__main__":
    main()
