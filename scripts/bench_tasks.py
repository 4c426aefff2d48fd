"""Task accuracy (lm-eval) of SmolLM2-135M, float and hfquant checkpoints, on the bundled task ``alice_next``.

Each row loads a model (the float reference, or a checkpoint written by ``hfquant run``) in its own subprocess and
runs lm-eval on it in-process (``hfquant.eval.tasks.evaluate_tasks``: ``HFLM(pretrained=<model>)`` and
``simple_evaluate``), the way ``evaluation.tasks`` and ``hfquant eval --tasks`` do; beside it the row's PPL-16K
(bundled WikiText-2 test, first 32 windows of 512 tokens) measured in the same process. Quantized models run on the
exact float32 reference kernel by default (``--kernel reference``, as scripts/bench_accuracy.py), so the table
measures the quantization itself; ``--kernel auto`` uses the fast kernels a user gets.

``--ruler N``: also lm-eval's own RULER variable-tracking task (``ruler_vt``, 4096 tokens, its first N items), the
standard lm-eval task found to run offline: its data is generated in-process with the model's tokenizer. It needs
the ``wonderwords`` package (lm-eval's ``ruler`` extra); without it the column says so.

Usage:
    python scripts/bench_tasks.py --out bench --update-benchmarks
    python scripts/bench_tasks.py --only float gptq-w4-g128 --limit 50     # some rows, the first 50 items
    python scripts/bench_tasks.py --wait 7200                               # wait for checkpoints being written
Writes ``OUT/tasks.json`` and ``OUT/tasks.md``; ``--update-benchmarks`` replaces the ``tasks`` block of BENCHMARKS.md.
The seconds are wall time of the whole task on the row's model (2 threads); they are valid only on an idle machine.
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

MODELS = ROOT / "models"
ROWS = {  # row -> (folder, what it is)
    "float": (MODELS / "smollm2-135m", "SmolLM2-135M float32"),
    "gptq-w4-g128": (MODELS / "ckpt" / "gptq-w4-g128", "GPTQ W4A16 g128 (the default recipe)"),
    "gptq-w4-g128-best": (MODELS / "ckpt" / "gptq-w4-g128-best", "GPTQ W4A16 g128, `quality: best`"),
    "sq-w8a8": (MODELS / "ckpt" / "sq-w8a8", "SmoothQuant W8A8"),
}
TASK = "alice_next"


def _ruler(model, tokenizer, folder: Path, limit: int) -> dict:
    """lm-eval's ``ruler_vt`` at 4096 tokens on the first ``limit`` items (data generated with ``folder``'s
    tokenizer), or ``{"skipped": why}``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hfquant.eval.tasks import summarize

    try:
        import wonderwords  # noqa: F401 - RULER's word lists
    except ImportError:
        return {"skipped": "needs `pip install wonderwords` (lm-eval's ruler extra)"}
    manager = TaskManager(include_path=str(Path(lm_eval.__file__).parent / "tasks" / "ruler"), include_defaults=False,
                          metadata={"pretrained": str(folder), "max_seq_lengths": [4096]})
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=["ruler_vt"],
                                  task_manager=manager, limit=limit, log_samples=False)
    return {**summarize(out)["ruler_vt"], "seconds": time.perf_counter() - t0}


def run_row(name: str, limit: int | None, batch_size: int, ruler: int, threads: int = 2) -> dict:
    """One row, in this process: load, PPL-16K, the task (and RULER vt)."""
    import torch

    from hfquant.app.saved import load_model, load_tokenizer, open_saved
    from hfquant.calibration.data import BUNDLED_EVALUATION
    from hfquant.eval import perplexity
    from hfquant.eval.tasks import evaluate_tasks

    torch.set_num_threads(threads)
    folder, what = ROWS[name]
    saved = open_saved(folder)
    model, tokenizer = load_model(saved), load_tokenizer(saved)
    row = {"row": name, "model": what, "folder": str(folder.relative_to(ROOT)), "threads": threads,
           "kernel": os.environ.get("HFQUANT_KERNEL", "auto"), "date": time.strftime("%Y-%m-%d %H:%M"),
           "load_average": os.getloadavg()[0]}
    row["ppl16k"] = perplexity(model, tokenizer, BUNDLED_EVALUATION.read_text(), seq_len=512, max_windows=32)
    t0 = time.perf_counter()
    result = evaluate_tasks(model, tokenizer, [TASK], limit=limit, batch_size=batch_size)
    row.update(seconds=time.perf_counter() - t0, lm_eval=result["lm_eval"], limit=limit, **result["tasks"][TASK])
    row["load_average_after"] = os.getloadavg()[0]
    if ruler:
        row["ruler_vt"] = _ruler(model, tokenizer, folder, ruler)
    return row


def _ready(folder: Path) -> bool:
    """A checkpoint is in place once its folder has a config.json (``hfquant run`` renames a finished folder in)."""
    return (folder / "config.json").is_file()


def _wait(names: list[str], seconds: float) -> None:
    deadline = time.time() + seconds
    while (missing := [n for n in names if not _ready(ROWS[n][0])]) and time.time() < deadline:
        print(f"waiting for {', '.join(missing)}", flush=True)
        time.sleep(60)


def _score(row: dict, metric: str) -> str:
    return f"{row[metric]:.3f} ± {row[metric + '_stderr']:.3f}" if row.get(metric) is not None else "—"


def markdown(rows: list[dict], meta: dict) -> str:
    from scripts.timing import table_header

    ruler = any("ruler_vt" in r for r in rows)
    head = "| row | model | alice_next acc | acc_norm | items | PPL-16K | task seconds |"
    lines = [*table_header(meta), f"lm-eval {meta.get('lm_eval', '?')}, 0-shot, batch size {meta['batch_size']}; "
             f"quantized models on the `{meta['kernel']}` kernel.", "",
             head + (" ruler_vt (4096) |" if ruler else ""), "|---" * (7 + ruler) + "|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['row']} | skipped: {r['skipped']} |" + " |" * (5 + ruler))
            continue
        cells = (f"| {r['row']} | {r['model']} | {_score(r, 'acc')} | {_score(r, 'acc_norm')} | {r['n']} | "
                 f"{r['ppl16k']:.2f} | {r['seconds']:.0f} ({r['threads']} threads, load {r['load_average']:.1f}) |")
        if ruler:
            vt = r.get("ruler_vt") or {}
            cells += (f" skipped: {vt['skipped']} |" if "skipped" in vt else
                      f" {vt.get('4096', float('nan')):.3f} ({vt.get('n')} items) |")
        lines.append(cells)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--only", nargs="*", help="rows to run (names of ROWS)")
    parser.add_argument("--limit", type=int, help="first LIMIT items of the task (default: all 500)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kernel", choices=["reference", "auto"], default="reference")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a contended machine)")
    parser.add_argument("--ruler", type=int, default=0, help="also RULER ruler_vt on its first N items (0: no)")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for checkpoints still being written")
    parser.add_argument("--update-benchmarks", action="store_true")
    parser.add_argument("--render", action="store_true", help="run nothing: write OUT/tasks.md from OUT/tasks.json")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        Path(args.row_out).write_text(json.dumps(run_row(args.row, args.limit, args.batch_size, args.ruler,
                                                         args.threads)))
        return
    from scripts.timing import run_meta, save_table

    if args.render:
        old = json.loads((args.out / "tasks.json").read_text())
        save_table(args.out, "tasks", old["meta"], old["rows"], markdown(old["rows"], old["meta"]),
                   "tasks" if args.update_benchmarks else None)
        return
    names = [n for n in ROWS if not args.only or n in args.only]
    _wait(names, args.wait)
    rows = []
    for name in names:
        if not _ready(ROWS[name][0]):
            rows.append({"row": name, "skipped": f"no checkpoint at {ROWS[name][0].relative_to(ROOT)}"})
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--row", name, "--row-out", f.name, "--batch-size", str(args.batch_size),
                   "--ruler", str(args.ruler), "--threads", str(args.threads),
                   *(["--limit", str(args.limit)] if args.limit else [])]
            env = {**os.environ, "HFQUANT_KERNEL": args.kernel, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            rows.append(json.loads(Path(f.name).read_text()) if proc.returncode == 0 else
                        {"row": name, "skipped": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}"})
        r = rows[-1]
        print(f"{name}: " + (r.get("skipped") or f"acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} ({r['n']} items), "
                                                  f"PPL-16K {r['ppl16k']:.2f}, {r['seconds']:.0f} s"), flush=True)
    meta = {**run_meta("bench_tasks.py", argv), "kernel": args.kernel, "batch_size": args.batch_size,
            "threads": args.threads, "lm_eval": next((r["lm_eval"] for r in rows if "lm_eval" in r), None)}
    for r in rows:
        r.setdefault("command", meta["command"])
    meta, rows = _merged(args.out / "tasks.json", meta, rows)
    save_table(args.out, "tasks", meta, rows, markdown(rows, meta), "tasks" if args.update_benchmarks else None)


def _merged(path: Path, meta: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """This run's rows over those an earlier run (same kernel and batch size) left in ``path``, in ``ROWS`` order, so
    rows can be measured one at a time; the commands of both are kept."""
    if not path.is_file():
        return meta, rows
    old = json.loads(path.read_text())
    if (old["meta"].get("kernel"), old["meta"].get("batch_size")) != (meta["kernel"], meta["batch_size"]):
        return meta, rows
    by_name = {r["row"]: r for r in old["rows"] if "skipped" not in r}
    by_name.update({r["row"]: r for r in rows if "skipped" not in r or r["row"] not in by_name})
    kept = [by_name[n] for n in ROWS if n in by_name]
    commands = list(dict.fromkeys(r.get("command", meta["command"]) for r in kept if "skipped" not in r))
    return {**meta, "command": "` ; `".join(commands or [meta["command"]])}, kept


if __name__ == "__main__":
    main()
