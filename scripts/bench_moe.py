"""MoE benchmark: the upcycled SmolLM2 MoE (``scripts/upcycle_moe.py``) float and quantized, next to dense SmolLM2.

Rows (``--rows``, all by default), each in its own subprocess so that its peak RSS is its own:

* ``float``: the MoE in float32 with transformers' default experts implementation (``grouped_mm``);
  ``float-eager``, ``float-batched_mm``: the same with its other CPU implementations (decode speed baselines);
  ``rtn-w4-g128``: ``HFQuantConfig(method="rtn", bits=4, group_size=128)``;
  ``gptq-w4-g128``: ``HFQuantConfig(bits=4, group_size=128)`` (hfquant's default); ``gptq-w4-g128-best``:
  ``HFQuantConfig(quality="best")``; ``smoothquant-w8a8``: ``HFQuantConfig(method="smoothquant")`` (experts
  unsmoothed, see README); all through ``AutoModelForCausalLM.from_pretrained(path, quantization_config=...)``.
* ``dense-float``, ``dense-gptq-w4-g128``: SmolLM2-135M itself (``--dense-model``), for reference.

Columns: PPL-16K (WikiText-2 ``test.txt``, first 32 non-overlapping 512-token windows, ``hfquant.eval.perplexity``)
and PPL-16K Alice (the same on the second bundled evaluation text, ``hfquant/data/alice``), each as a ratio to the
float MoE (dense rows: to dense float); quantization wall time (the whole ``from_pretrained`` call); peak RSS of the
row's process (load, quantization, evaluation, decode and saving); checkpoint size (``save_pretrained``); decode
tokens/s (batch 1, the first 16 tokens of WikiText-2 ``valid.txt`` as prompt, ``--new-tokens`` (64) greedy tokens,
``min_new_tokens`` so every run makes that many; median of ``--repeats`` (3) runs after one untimed; rows run one
after another, not interleaved, so a busy spell of a shared machine falls on one row) and its ratio to the float MoE;
from the run report's weight coverage (``model.hfquant_report["weights"]``, where the installed
hfquant writes it; blank otherwise): the share of the linear-algebra weights (all 2-D+ weights but embeddings and
biases: attention, experts, routers, the head) stored quantized, the share of the experts' weights quantized, and bits
per weight over them all (quantized ones as stored with their scales and zero points, float ones at their dtype; the
tied float32 head counts); tokens per expert (min / median / max over every layer's experts) as the float MoE routes
the calibration windows (128 x 512 tokens of WikiText-2 ``valid.txt``, seed 0: the windows ``HFQuantConfig``
calibrates on, ``hfquant.calibration.data.windows_for``), counted with hooks on the routers
(``mlp.gate``). GPTQ calibrates block by block on the outputs of the blocks already quantized, so its own routing
differs a little from the float model's.

Perplexity of quantized rows is measured with the exact float32 reference kernel (``--kernel reference``, the default,
as ``bench_accuracy.py``); decode speed always uses the fast kernels (``HFQUANT_KERNEL`` unset).

Writes ``OUT/moe.json`` and ``OUT/moe.md``; ``--update-benchmarks`` replaces the section between
``<!-- moe:begin -->`` and ``<!-- moe:end -->`` of BENCHMARKS.md (``--marker`` for another).

Usage:
    python scripts/upcycle_moe.py                                       # models/smollm2-moe-8x
    python scripts/bench_moe.py --out bench --update-benchmarks
    python scripts/bench_moe.py --rows float rtn-w4-g128 --quick --out /tmp/moe   # smoke test: few windows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.calibration.data import (BUNDLED_CALIBRATION, BUNDLED_EVALUATION, BUNDLED_EVALUATION_2, tokenize_text,
                                      windows_for)
from hfquant.eval import perplexity
from hfquant.formats.files import tensor_headers
from hfquant.kernels import reference_kernels

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.timing import median_seconds, run_meta, save_table, table_header  # noqa: E402
from scripts.upcycle_moe import RoutingCounter, param_counts, routing_summary  # noqa: E402

# name -> (HFQuantConfig fields or None for the float model, which model: "moe" or "dense")
ROWS: dict[str, tuple[dict | None, str]] = {
    "float": (None, "moe"),
    "float-eager": (None, "moe"),
    "float-batched_mm": (None, "moe"),
    "rtn-w4-g128": ({"method": "rtn", "bits": 4, "group_size": 128}, "moe"),
    "gptq-w4-g128": ({"bits": 4, "group_size": 128}, "moe"),
    "gptq-w4-g128-best": ({"quality": "best"}, "moe"),
    "smoothquant-w8a8": ({"method": "smoothquant"}, "moe"),
    "dense-float": (None, "dense"),
    "dense-gptq-w4-g128": ({"bits": 4, "group_size": 128}, "dense"),
}
BASELINE = {"moe": "float", "dense": "dense-float"}
# float rows with another of transformers' experts implementations than its default (``grouped_mm``)
EXPERTS_IMPLEMENTATION = {"float-eager": "eager", "float-batched_mm": "batched_mm"}
# --quick: every size small, for smoke tests (the numbers mean nothing)
QUICK = {"windows": 4, "calibration_windows": 8, "new_tokens": 16, "repeats": 1}
FULL = {"windows": 32, "calibration_windows": 128, "new_tokens": 64, "repeats": 3}


def load_row(name: str, args) -> tuple[object, dict]:
    """The row's model (float, or quantized on load) and its load/quantization facts."""
    spec, which = ROWS[name]
    path = args.model if which == "moe" else args.dense_model
    row: dict = {"row": name, "model": which, "path": str(path), "config": spec}
    t0 = time.perf_counter()
    if spec is None:
        impl = {"experts_implementation": EXPERTS_IMPLEMENTATION[name]} if name in EXPERTS_IMPLEMENTATION else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **impl)
        row["quant_seconds"] = None
    else:
        cfg = hfquant.HFQuantConfig(**spec, num_samples=args.calibration_windows)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
        row["quant_seconds"] = time.perf_counter() - t0
        report = getattr(model, "hfquant_report", {})
        row["quantized_modules"] = sum(1 for m in report.get("modules", []) if m.get("bits"))
        row["damp_retries"] = report.get("damp_retries")
    row["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    row["params"] = param_counts(model) if spec is None else None
    return model.eval(), row


def perplexities(model, tokenizer, args) -> dict:
    """PPL-16K on WikiText-2 test and on the second evaluation text (reference kernel unless ``--kernel auto``)."""
    exact = reference_kernels() if args.kernel == "reference" else contextlib.nullcontext()
    with exact:
        return {"ppl16k": perplexity(model, tokenizer, BUNDLED_EVALUATION.read_text(), seq_len=512,
                                     max_windows=args.windows),
                "ppl16k_alice": perplexity(model, tokenizer, BUNDLED_EVALUATION_2.read_text(), seq_len=512,
                                           max_windows=args.windows)}


def decode_speed(model, tokenizer, args) -> dict:
    """Greedy decode tokens/s at batch 1 after a 16-token prompt from WikiText-2 valid (fast kernels)."""
    prompt = tokenize_text(BUNDLED_CALIBRATION.read_text()[:2000], tokenizer)[:16].unsqueeze(0)
    n = args.new_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def run():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=pad)
    seconds = median_seconds(run, args.repeats, warmup=1)
    return {"decode_tok_s": n / seconds, "decode_ms_per_token": seconds / n * 1e3}


@torch.no_grad()
def calibration_routing(model, tokenizer, args) -> dict:
    """Tokens per expert as the float MoE routes the calibration windows ``HFQuantConfig`` samples."""
    windows = windows_for(hfquant.HFQuantConfig(num_samples=args.calibration_windows), tokenizer)
    with RoutingCounter(model) as counter:
        for window in windows:
            model(input_ids=window.unsqueeze(0))
    return routing_summary(counter.counts, model.config.num_experts_per_tok)


def expert_weight_elements(folder: Path) -> int:
    """Elements of the experts' weights in a float checkpoint, read from its headers (per-expert 2-D tensors in the
    Hub layout, or fused 3-D ones)."""
    return sum(math.prod(shape) for key, shape, _ in tensor_headers(sorted(Path(folder).glob("*.safetensors")))
               if ".experts." in key and len(shape) >= 2)


def checkpoint_mb(model) -> dict:
    """The size of the row's ``save_pretrained`` safetensors, or the first line of why saving failed."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(tmp)
        except Exception as exc:  # report the failure in the row, keep the other measurements
            return {"checkpoint_mb": None, "save_error": str(exc).splitlines()[0][:160]}
        return {"checkpoint_mb": sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20}


def coverage_facts(report: dict, row: dict) -> dict:
    """From the run report's weight coverage (``hfquant_report["weights"]``, where the installed hfquant writes it):
    bits per weight over the linear-algebra weights, the share of them stored quantized and the share of the
    experts' weights quantized. Empty where the report has no coverage."""
    weights = report.get("weights")
    if not isinstance(weights, dict) or "bits_per_weight" not in weights:
        return {}
    floats = weights.get("float_weights", {})
    linear = weights["quantized_weights"] + sum(v for k, v in floats.items() if k not in ("embedding", "bias"))
    experts = expert_weight_elements(Path(row["path"])) if row["model"] == "moe" else 0
    return {"coverage": weights, "bits_per_weight": weights["bits_per_weight"],
            "quantized_share": weights["quantized_weights"] / linear if linear else None,
            "experts_quantized_share": weights.get("expert_weights_quantized", 0) / experts if experts else None}


def run_row(name: str, args) -> dict:
    """Run one row in this process and return its measurements."""
    torch.manual_seed(0)
    model, row = load_row(name, args)
    tokenizer = AutoTokenizer.from_pretrained(row["path"])
    t0 = time.perf_counter()
    row.update(perplexities(model, tokenizer, args))
    row["eval_seconds"] = time.perf_counter() - t0
    row.update(decode_speed(model, tokenizer, args))
    if name == BASELINE["moe"]:
        row["routing"] = calibration_routing(model, tokenizer, args)
    row.update(checkpoint_mb(model))
    row.update(coverage_facts(getattr(model, "hfquant_report", {}) or {}, row))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _ratio(value, base) -> str:
    return f"{value / base:.3f}x" if value is not None and base else ""


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table_row(r: dict, bases: dict) -> str:
    """One markdown line of the table."""
    if "skipped" in r:
        return f"| {r['row']} | skipped: {r['skipped']} |" + " |" * 13
    base = bases.get(r["model"]) or {}
    route = r.get("routing")
    experts = f"{route['min']} / {route['median']:.0f} / {route['max']}" if route else ""
    quantized = r["config"] is not None
    share = _num(r.get("quantized_share"), ".1%") if quantized else ""
    experts_share = _num(r.get("experts_quantized_share"), ".1%") if quantized and r["model"] == "moe" else ""
    bits = _num(r.get("bits_per_weight"), ".2f") if quantized else ""
    speed_base = (bases.get("moe") or {}).get("decode_tok_s")
    cells = [r["row"], f"{r['ppl16k']:.2f}", _ratio(r["ppl16k"], base.get("ppl16k")), f"{r['ppl16k_alice']:.2f}",
             _ratio(r["ppl16k_alice"], base.get("ppl16k_alice")), _num(r.get("quant_seconds"), ".1f"),
             f"{r['peak_rss_mb']:.0f}", _num(r.get("checkpoint_mb"), ".1f"), f"{r['decode_tok_s']:.1f}",
             _ratio(r["decode_tok_s"], speed_base), share, experts_share, bits, experts]
    return "| " + " | ".join(cells) + " |"


def describe_moe(rows: list[dict], meta: dict) -> list[str]:
    """Lines under the machine line: the MoE's shape and how it was made, the settings of the run."""
    lines = []
    float_row = next((r for r in rows if r.get("row") == BASELINE["moe"] and "skipped" not in r), None)
    if meta.get("upcycle"):
        s = meta["upcycle"]
        lines.append(f"MoE: `{meta['moe_model']}`, SmolLM2-135M upcycled by `scripts/upcycle_moe.py` ({s['arch']}, "
                     f"{s['experts']} experts, top-{s['top_k']}, expert noise {s['noise']} x std, seed {s['seed']}).")
    if float_row:
        p = float_row["params"]
        lines.append(f"MoE parameters: {p['total'] / 1e6:.1f} M, {p['experts'] / 1e6:.1f} M of them in experts, "
                     f"{p['active_per_token'] / 1e6:.1f} M active per token; transformers experts implementation "
                     f"`{float_row['experts_implementation']}`.")
        route = float_row["routing"]
        lines.append(f"Tokens per expert over the {meta['calibration_windows']} calibration windows (float MoE, every "
                     f"layer's experts): min {route['min']} / median {route['median']:.0f} / max {route['max']}, "
                     f"uniform share {route['uniform']:.0f}, {route['experts_with_no_tokens']} experts with none.")
    lines.append(f"PPL-16K: first {meta['windows']} windows of 512 tokens; quantized rows evaluated with the "
                 f"`{meta['kernel']}` kernel. Calibration: {meta['calibration_windows']} x 512 tokens of WikiText-2 "
                 f"valid, seed 0. Decode: batch 1, 16-token prompt, {meta['new_tokens']} new tokens (greedy), median "
                 f"of {meta['repeats']} runs, fast kernels; vs float = against the float MoE.")
    return lines + [""]


def markdown(rows: list[dict], meta: dict) -> str:
    """The table under the shared command and machine lines."""
    bases = {which: next((r for r in rows if r["row"] == name and "skipped" not in r), None)
             for which, name in BASELINE.items()}
    lines = [*table_header(meta), *describe_moe(rows, meta),
             "| row | PPL-16K | vs float | PPL-16K Alice | vs float | quantization wall time (s) | peak RSS (MiB) | "
             "checkpoint (MiB) | decode tok/s | vs float MoE | weights quantized | experts quantized | bits/weight | "
             "tokens per expert, calibration (min / median / max) |",
             "|" + "---|" * 14]
    return "\n".join(lines + [table_row(r, bases) for r in rows]) + "\n"


def run_rows(args) -> list[dict]:
    """Every asked row in a fresh subprocess; a failed row is kept as ``skipped`` with its last error line."""
    rows = []
    for name in args.rows:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--row", name, "--row-out", f.name, "--model", str(args.model),
                   "--dense-model", str(args.dense_model), "--kernel", args.kernel,
                   *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in FULL),
                   *([f"--threads={args.threads}"] if args.threads else [])]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"row": name, "skipped": f"failed: {last[:160]}"})
            else:
                rows.append(json.loads(Path(f.name).read_text()))
        r = rows[-1]
        print(f"{name}: " + (r.get("skipped") or f"PPL-16K {r['ppl16k']:.3f}, Alice {r['ppl16k_alice']:.3f}, "
                             f"quant {r.get('quant_seconds') or 0:.1f}s, RSS {r['peak_rss_mb']:.0f} MiB, "
                             f"decode {r['decode_tok_s']:.1f} tok/s"), flush=True)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-moe-8x", help="the upcycled MoE")
    parser.add_argument("--dense-model", type=Path, default=ROOT / "models" / "smollm2-135m")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--quick", action="store_true", help=f"smoke test sizes: {QUICK} (explicit flags win)")
    parser.add_argument("--windows", type=int, help=f"evaluation windows (default {FULL['windows']})")
    parser.add_argument("--calibration-windows", type=int,
                        help=f"calibration windows of 512 tokens (default {FULL['calibration_windows']})")
    parser.add_argument("--new-tokens", type=int, help=f"decoded tokens per run (default {FULL['new_tokens']})")
    parser.add_argument("--repeats", type=int, help=f"timed decode runs (default {FULL['repeats']})")
    parser.add_argument("--kernel", choices=["reference", "auto"], default="reference",
                        help="kernel for the quantized rows' perplexity (decode speed always uses the fast kernels)")
    parser.add_argument("--threads", type=int,
                        help="torch threads in every row (default: torch's own; on a busy shared machine 1 thread "
                             "avoids OpenMP spin-waits that slow 2-thread decode several times)")
    parser.add_argument("--update-benchmarks", action="store_true")
    parser.add_argument("--marker", default="moe", help="BENCHMARKS.md section to replace")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        Path(args.row_out).write_text(json.dumps(run_row(args.row, args)))
        return
    for which, path in (("moe", args.model), ("dense", args.dense_model)):
        if any(ROWS[r][1] == which for r in args.rows) and not (path / "config.json").is_file():
            hint = ("python scripts/upcycle_moe.py" if which == "moe"
                    else "python scripts/prepare_reference_model.py --out models")
            sys.exit(f"error: no model at {path}; run: {hint}")
    rows = run_rows(args)
    meta = {**run_meta("bench_moe.py", argv), "moe_model": str(args.model), "dense_model": str(args.dense_model),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "quick": args.quick,
            **{k: getattr(args, k) for k in (*FULL, "kernel")}}
    upcycle = args.model / "upcycle.json"
    meta["upcycle"] = json.loads(upcycle.read_text())["settings"] if upcycle.is_file() else None
    md = markdown(rows, meta)
    save_table(args.out, "moe", meta, rows, md, args.marker if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
