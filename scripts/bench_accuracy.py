"""Accuracy benchmark on SmolLM2-135M: PPL-16K, quantization wall time, peak RSS and checkpoint size.

Each row runs in its own subprocess so its peak RSS is its own. Writes ``OUT/accuracy.json`` and
``OUT/accuracy.md``; with ``--update-benchmarks`` the markdown table also replaces the block between
the accuracy markers in ``BENCHMARKS.md``.

PPL-16K: WikiText-2 test.txt tokenized whole, first 32 non-overlapping 512-token windows,
exp(mean NLL); "PPL-16K Alice": the same on the second evaluation text (hfquant/data/alice, not WikiText);
"PPL valid": the last 8 windows of 512 tokens of WikiText-2 valid.txt, the split choices are made on.
Calibration: 128 windows x 512 tokens of valid.txt, seed 0.

Quantized models are evaluated with the exact float32 reference kernel (``HFQUANT_KERNEL=reference``,
``--kernel reference``, the default) so the table measures the quantization itself; ``--kernel auto``
evaluates through the fast kernels instead (on CPU, torch's int4 kernel rounds activations and scales
to bf16: RTN W4 g128 sym measured 36.7464 with it against 36.7151 with the reference).

Usage:
    python scripts/prepare_reference_model.py --out models
    python scripts/bench_accuracy.py --model models/smollm2-135m --out bench --update-benchmarks
    python scripts/bench_accuracy.py --only gptq-w4-g64   # a subset (substring match on row names; a full row
                                                          # name selects that row alone)
    python scripts/bench_accuracy.py --only head8 --marker accuracy-head8 --out bench/head8 --update-benchmarks
    python scripts/bench_accuracy.py --merge bench/a/accuracy.json bench/b/accuracy.json --marker m --out bench/m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The reference rows pin the reference grid (``observer: minmax``); the default config now searches its grids.
GPTQ = {"method": "gptq", "observer": "minmax"}
RTN = {"method": "rtn", "observer": "minmax"}
STATIC_ACT = {"desc_act": True, "static_groups": True}
ROWS: dict[str, dict | None] = {
    "fp32": None,
    "rtn-w4-g128-sym": {**RTN, "group_size": 128, "sym": True},
    "rtn-w4-g128-asym": {**RTN, "group_size": 128, "sym": False},
    "rtn-w4-g64-sym": {**RTN, "group_size": 64, "sym": True},
    "rtn-w4-g64-asym": {**RTN, "group_size": 64, "sym": False},
    "bnb-nf4-b64": {"method": "bnb-nf4"},
    "gptq-w4-g64-sym": {**GPTQ, "group_size": 64, "sym": True, "desc_act": False},
    "gptq-w4-g64-sym-actorder": {**GPTQ, "group_size": 64, "sym": True, **STATIC_ACT},
    "gptq-w4-g64-sym-actorder-dynamic": {**GPTQ, "group_size": 64, "sym": True, "desc_act": True, "static_groups": False},
    "gptq-w4-g64-asym-actorder": {**GPTQ, "group_size": 64, "sym": False, **STATIC_ACT},
    "gptq-w4-g128-sym": {**GPTQ, "group_size": 128, "sym": True, "desc_act": False},
    "gptq-w4-g128-sym-actorder": {**GPTQ, "group_size": 128, "sym": True, **STATIC_ACT},
    "gptq-w4-g128-asym-actorder": {**GPTQ, "group_size": 128, "sym": False, **STATIC_ACT},
    "rtn-w4-g128-asym-head8": {**RTN, "group_size": 128, "sym": False, "lm_head_bits": 8},
    "gptq-w4-g128-asym-actorder-head8": {**GPTQ, "group_size": 128, "sym": False, **STATIC_ACT, "lm_head_bits": 8},
    "gptq-w3-g128-asym-actorder": {**GPTQ, "bits": 3, "group_size": 128, "sym": False, **STATIC_ACT},
    "gptq-w2-g64-asym-actorder": {**GPTQ, "bits": 2, "group_size": 64, "sym": False, **STATIC_ACT},
    "w8a8-nosmooth": {"method": "smoothquant", "alpha": None},
    "smoothquant-w8a8-a0.5": {"method": "smoothquant", "alpha": 0.5},
    "smoothquant-w8a8-a0.8": {"method": "smoothquant", "alpha": 0.8},
    "smoothquant-w8a8-auto": {"method": "smoothquant", "alpha": "auto"},
    "smoothquant-w8a8-a0.8-gptq": {"method": "smoothquant", "alpha": 0.8, "weight_method": "gptq"},
}

# Issue 20: the Hessian-weighted grid search ("hessian" observer) and asymmetric calibration (GPTAQ), alone and
# together, for W4 g128 sym/asym, W3 g128 asym and W2 g64 asym.
for _bits, _g, _sym in ((4, 128, True), (4, 128, False), (3, 128, False), (2, 64, False)):
    _base = f"gptq-w{_bits}-g{_g}-{'sym' if _sym else 'asym'}-actorder"
    for _suffix, _extra in (("-hessian", {"observer": "hessian"}), ("-gptaq", {"gptaq": True}),
                            ("-hessian-gptaq", {"observer": "hessian", "gptaq": True}),
                            ("-hessian-rec16", {"observer": "hessian", "reconstruct_steps": 16}),
                            ("-hessian-gptaq-rec16", {"observer": "hessian", "gptaq": True, "reconstruct_steps": 16}),
                            ("-hessian-gptaq-rec32", {"observer": "hessian", "gptaq": True, "reconstruct_steps": 32})):
        ROWS[_base + _suffix] = {**GPTQ, "bits": _bits, "group_size": _g, "sym": _sym, **STATIC_ACT, **_extra}
    # What users get: HFQuantConfig(bits, group_size, sym) and the same with quality="best".
    for _quality in ("default", "best"):
        ROWS[f"gptq-w{_bits}-g{_g}-{'sym' if _sym else 'asym'}-quality-{_quality}"] = {
            "method": "gptq", "bits": _bits, "group_size": _g, "sym": _sym, "quality": _quality}
ROWS["rtn-w4-g128-sym-hessian"] = {**RTN, "group_size": 128, "sym": True, "observer": "hessian"}
ROWS["rtn-w4-g128-asym-hessian"] = {**RTN, "group_size": 128, "sym": False, "observer": "hessian"}


def _dir_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def run_row(name: str, model_path: str, extra: dict, windows: int, dtype_name: str = "float32") -> dict:
    """Run one row in this process and return its measurements."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant
    from hfquant.calibration.data import BUNDLED_EVALUATION, BUNDLED_EVALUATION_2
    from hfquant.eval import perplexity
    from hfquant.mixed.budget import valid_ids

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    spec = ROWS[name]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    row: dict = {"row": name, "config": spec}
    t0 = time.perf_counter()
    if spec is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        row["quant_seconds"] = None
    elif spec["method"] == "bnb-nf4":
        try:
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb, dtype=torch.float32)
        except Exception as exc:  # not installed, or no backend for this CPU
            return {**row, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        row["quant_seconds"] = time.perf_counter() - t0
    else:
        cfg = hfquant.HFQuantConfig(**{**spec, **extra})
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=cfg, dtype=dtype)
        row["quant_seconds"] = time.perf_counter() - t0
        report = getattr(model, "hfquant_report", {})
        row["damp_retries"] = report.get("damp_retries")
        if spec["method"] == "smoothquant":
            smoothed = {(m["name"].rsplit(".", 2)[0], m["smoothed_by"]) for m in report["modules"] if m["smoothed"]}
            row["smoothed_groups"] = len(smoothed)
    text = BUNDLED_EVALUATION.read_text()
    t1 = time.perf_counter()
    row["ppl16k"] = perplexity(model, tokenizer, text, seq_len=512, max_windows=windows)
    row["eval_seconds"] = time.perf_counter() - t1
    row["ppl16k_alice"] = perplexity(model, tokenizer, BUNDLED_EVALUATION_2.read_text(), seq_len=512, max_windows=windows)
    # The selection metric (what choices may look at): the last 8 windows of 512 tokens of WikiText-2 valid.
    row["ppl_valid"] = perplexity(model, tokenizer, valid_ids(tokenizer, 512, 8), seq_len=512)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(tmp)
            row["checkpoint_mb"] = _dir_mb(Path(tmp))
        except Exception as exc:
            row["checkpoint_mb"] = None
            row["save_error"] = str(exc).splitlines()[0][:160]
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    from scripts.timing import table_header

    lines = [
        *table_header(meta),
        f"Model dtype: {meta.get('dtype', 'float32')} (the `fp32` row is the float model in that dtype).",
        "",
        "| row | PPL-16K | vs float | PPL-16K Alice | vs float | PPL valid | quantization wall time (s) | peak RSS (MiB) | checkpoint (MiB) | smoothed groups |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r["ppl16k"] for r in rows if r["row"] == "fp32" and "ppl16k" in r), None)
    base2 = next((r.get("ppl16k_alice") for r in rows if r["row"] == "fp32" and "ppl16k" in r), None)
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['row']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        qs = "—" if r.get("quant_seconds") is None else f"{r['quant_seconds']:.1f}"
        rel = f"{r['ppl16k'] / base:.3f}x" if base else ""
        ck = "—" if r.get("checkpoint_mb") is None else f"{r['checkpoint_mb']:.1f}"
        sg = r.get("smoothed_groups", "")
        alice = r.get("ppl16k_alice")
        a = "" if alice is None else f"{alice:.2f}"
        rel2 = f"{alice / base2:.3f}x" if alice is not None and base2 else ""
        pv = "" if r.get("ppl_valid") is None else f"{r['ppl_valid']:.2f}"
        lines.append(f"| {r['row']} | {r['ppl16k']:.2f} | {rel} | {a} | {rel2} | {pv} | {qs} | {r['peak_rss_mb']:.0f} | {ck} | {sg} |")
    return "\n".join(lines) + "\n"


def update_benchmarks(md: str, marker: str = "accuracy") -> None:
    path = ROOT / "BENCHMARKS.md"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{md}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--kernel", choices=["reference", "auto"], default="reference",
                        help="kernel used to evaluate quantized models (HFQUANT_KERNEL); see the docstring")
    parser.add_argument("--set", nargs="*", default=[], help="extra HFQuantConfig fields for every row, key=json")
    parser.add_argument("--update-benchmarks", action="store_true")
    parser.add_argument("--marker", default="accuracy",
                        help="BENCHMARKS.md section to replace (a run of some rows with --only: its own marker)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype the model is loaded in for every row (the fp32 row is then the float baseline in it)")
    parser.add_argument("--merge", nargs="*", type=Path,
                        help="no run: one table of the rows of these accuracy.json files (each run's command is listed)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}

    if args.row:
        Path(args.row_out).write_text(json.dumps(run_row(args.row, args.model, extra, args.windows, args.dtype)))
        return
    if args.merge:
        from scripts.timing import save_table

        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        meta = dict(runs[0]["meta"], command="` ; `".join(r["meta"]["command"] for r in runs))
        rows = [row for r in runs for row in r["rows"]]
        save_table(args.out, args.marker, meta, rows, markdown(rows, meta), args.marker if args.update_benchmarks else None)
        return

    if not Path(args.model, "config.json").is_file():
        sys.exit(f"error: no model at {args.model}; run: python scripts/prepare_reference_model.py --out models")
    # An --only item that is a row's full name selects that row alone; any other item is a substring.
    names = [n for n in ROWS if not args.only or n in args.only or any(o in n for o in args.only if o not in ROWS)]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--model", args.model, "--row", name, "--row-out", f.name,
                   "--windows", str(args.windows), "--dtype", args.dtype, "--set", *args.set]
            env = {**os.environ, "HFQUANT_KERNEL": args.kernel}
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            if proc.returncode != 0:
                rows.append({"row": name, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1][:160]}"})
            else:
                rows.append(json.loads(Path(f.name).read_text()))
        r = rows[-1]
        print(f"{name}: " + (r.get("skipped") or f"PPL-16K {r['ppl16k']:.3f}, quant {r.get('quant_seconds') or 0:.1f}s, "
                             f"RSS {r['peak_rss_mb']:.0f} MiB, ckpt {r.get('checkpoint_mb') or 0:.1f} MiB"), flush=True)
    from scripts.timing import run_meta, save_table

    meta = run_meta("bench_accuracy.py", argv)
    meta["dtype"] = args.dtype
    save_table(args.out, args.marker, meta, rows, markdown(rows, meta), args.marker if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
