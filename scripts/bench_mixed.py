"""Mixed-precision benchmark on SmolLM2-135M: uniform W3/W4 g128 against ``bits: auto`` at average-bit targets.

Every row is GPTQ with the default recipe settings (sym, act-order with static groups, true-sequential,
damp 0.01; calibration 128 x 512 tokens of WikiText-2 valid, seed 0). Reported per row:

* PPL-16K: WikiText-2 test, first 32 windows of 512 tokens (as ``bench_accuracy.py``; reference kernel);
* PPL valid: the last 8 windows of 512 tokens of WikiText-2 valid (what ``max_ppl_increase`` uses; the
  split to compare allocation variants on, never the test split);
* true average bits: measured from the saved safetensors (``weight`` + ``scales`` + ``zeros`` + ``g_idx``
  bits over the quantized modules' ``in * out``), and the allocation's prediction for the auto rows.

The auto rows run exactly what ``bits: auto`` runs (``hfquant.mixed.resolve.auto_schemes``: sensitivity on the
float model, then the budget allocation), except that the sensitivity table is measured once and shared
by both targets (it does not depend on the target); the allocation is then quantized through
``module_schemes``, which ``tests/mixed/test_mixed.py`` checks gives the same model as a ``bits: auto`` run.

Usage:
    python scripts/bench_mixed.py --out bench [--update-benchmarks] [--only auto] [--sensitivity FILE]
    python scripts/bench_mixed.py --out bench --collect --update-benchmarks   # table from rows run separately
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = {
    "gptq-w3-g128": {"bits": 3},
    "gptq-w4-g128": {"bits": 4},
    "auto-3.5": {"target_avg_bits": 3.5},
    "auto-3.25": {"target_avg_bits": 3.25},
    # The same table's unweighted relative proxy loss (what ``fisher_windows: 0`` minimises), for comparison.
    "auto-3.5-relative": {"target_avg_bits": 3.5, "relative": True},
    "auto-3.25-relative": {"target_avg_bits": 3.25, "relative": True},
}


def _without_fisher(table: dict) -> dict:
    return {**table, "modules": {n: {k: v for k, v in m.items() if not k.startswith("fisher_")}
                                 for n, m in table["modules"].items()}}


def _valid_ppl(model, tokenizer) -> float:
    from hfquant.mixed.budget import valid_ids
    from hfquant.eval import perplexity

    return perplexity(model, None, valid_ids(tokenizer, 512, 8), seq_len=512, max_windows=8)


def run(model_path: str, names: list[str], out: Path, sensitivity_file: Path | None) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant
    from hfquant.mixed.budget import allocate_bits
    from hfquant.calibration.data import BUNDLED_EVALUATION, calibration_windows
    from hfquant.eval import perplexity
    from hfquant.core.schemes import summary
    from hfquant.mixed.resolve import scale_bits_of
    from hfquant.app.report import stored_average_bits, write_sensitivity
    from hfquant.mixed.budget import has_fisher
    from hfquant.mixed.sensitivity import measure_for_config

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    test_text = BUNDLED_EVALUATION.read_text()
    table = None
    circled = False
    rows = []
    for name in names:
        spec = ROWS[name]
        torch.manual_seed(0)
        row: dict = {"row": name}
        kw: dict = {"method": "gptq", "group_size": 128}
        if "bits" in spec:
            kw["bits"] = spec["bits"]
        else:
            if table is None:
                if sensitivity_file is not None:
                    table = json.loads(sensitivity_file.read_text())
                    row["sensitivity_from"] = str(sensitivity_file)
                else:
                    fp = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
                    windows = calibration_windows(tokenizer, num_samples=128, seq_len=512, seed=0)
                    keep = (lambda n: not n.endswith("lm_head"))
                    auto = hfquant.HFQuantConfig(method="gptq", bits="auto", target_avg_bits=3.5)  # defaults of bits: auto
                    table = measure_for_config(fp, list(windows.split(auto.calibration_batch_size)), keep, auto,
                                               progress=False)
                    del fp
                write_sensitivity(out, table)  # rewritten with the first Fisher-objective row's allocation circled
                print(f"sensitivity: {len(table['modules'])} modules x {len(table['candidates'])} candidates, "
                      f"{table['seconds']:.1f} s", flush=True)
            objective = "relative proxy" if spec.get("relative") or not has_fisher(table) else "estimated loss (Fisher)"
            allocation, predicted = allocate_bits(_without_fisher(table) if spec.get("relative") else table,
                                                  spec["target_avg_bits"], 32)
            if not spec.get("relative") and not circled:
                write_sensitivity(out, table, allocation)
                circled = row["circled_in_plot"] = True
            row.update(target_avg_bits=spec["target_avg_bits"], predicted_avg_bits=predicted, objective=objective,
                       allocation=summary(allocation), sensitivity_seconds=table["seconds"])
            kw["module_schemes"] = {n: {**s, "sym": True, "method": "gptq"} for n, s in allocation.items()}
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=hfquant.HFQuantConfig(**kw),
                                                     dtype=torch.float32).eval()
        row["quant_seconds"] = time.perf_counter() - t0
        assert scale_bits_of(model) == 32
        t1 = time.perf_counter()
        row["ppl16k"] = perplexity(model, tokenizer, test_text, seq_len=512, max_windows=32)
        row["eval_seconds"] = time.perf_counter() - t1
        row["ppl_valid"] = _valid_ppl(model, tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            row["true_avg_bits"] = stored_average_bits(Path(tmp))["avg_bits"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / f"mixed-{name}.json").write_text(json.dumps(row, indent=1))
        del model
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    from scripts.timing import table_header

    lines = [
        *table_header(meta),
        "| row | PPL-16K (test) | PPL valid (8 x 512) | true avg bits (saved) | predicted avg bits | allocation | objective | quantization (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pred = f"{r['predicted_avg_bits']:.4f}" if "predicted_avg_bits" in r else "—"
        lines.append(f"| {r['row']} | {r['ppl16k']:.2f} | {r['ppl_valid']:.2f} | {r['true_avg_bits']:.4f} | {pred} | "
                     f"{r.get('allocation', 'uniform')} | {r.get('objective', '—')} | {r['quant_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--only", nargs="*", help="rows named so, or whose name contains one of these")
    parser.add_argument("--sensitivity", type=Path, help="reuse a sensitivity table (JSON) measured on the same model and data")
    parser.add_argument("--collect", action="store_true",
                        help="measure nothing: build the table from the OUT/mixed-ROW.json files of earlier runs")
    parser.add_argument("--update-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HFQUANT_KERNEL", "reference")
    names = [n for n in ROWS if not args.only or any(o == n or (o not in ROWS and o in n) for o in args.only)]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.collect:
        rows = [json.loads((args.out / f"mixed-{n}.json").read_text()) for n in names]
    else:
        rows = run(args.model, names, args.out, args.sensitivity)
    from scripts.timing import run_meta, save_table

    meta = run_meta("bench_mixed.py", argv)
    save_table(args.out, "mixed", meta, rows, markdown(rows, meta), "mixed" if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
