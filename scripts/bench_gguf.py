"""GGUF benchmark on SmolLM2-135M: hfquant's GPTQ (and RTN) on GGUF grids against llama.cpp's own quantizer.

Rows, for each type (``--types``, default Q4_0, Q4_1, Q8_0, Q4_K_M, Q3_K_M):

* ``hfquant-gptq``: ``from_pretrained(..., HFQuantConfig(gguf_type=T))`` (calibration 128 x 512 tokens of WikiText-2
  valid, the defaults), saved, exported with ``hfquant export --format gguf``; skipped with a note where this
  hfquant does not accept ``gguf_type=T``;
* ``hfquant-rtn``: the same grid rounded to nearest (``method: rtn``), skipped likewise;
* ``llama.cpp``: llama.cpp's quantizer on the float model (an F32 GGUF written by hfquant's exporter, row ``f32``)
  to the same file type, no importance matrix;
* ``llama.cpp-imatrix``: the same with an importance matrix, as llama.cpp users quantize: ``llama-imatrix`` over the
  text hfquant calibrates on (the bundled WikiText-2 *valid*, ``--imatrix-chunks`` (128) chunks of 512 tokens: the
  first ones of the file, where hfquant draws 128 windows at seeded random offsets), then ``llama-quantize --imatrix``.
  Where the importance matrix makes llama.cpp pick other tensor types than without it (Q4_0: the first eighth of
  ``ffn_down`` becomes Q4_1), those tensors are set back to the plain row's types (``--tensor-type-file``), so the
  file is the same size as the other rows' of its type; the row's ``forced_types`` lists them;
* ``llama.cpp-imatrix-own-mix``: llama.cpp's imatrix file with its own tensor types (not run by default).

Without ``--rows``: every row for every type, the imatrix row only for ``IMATRIX_TYPES``. The llama.cpp rows use the
command-line tools from ``scripts/build_llamacpp_tools.sh`` (``--llamacpp-bin``); without them the plain row falls
back to llama-cpp-python's ``llama_model_quantize`` and the imatrix rows are skipped.

Each file is evaluated on PPL-16K (WikiText-2 test, first 32 windows of 512 tokens): by hfquant (its own model,
hfquant rows only), by transformers' GGUF loader (``gguf_file=``, de-quantized to float32), and by llama.cpp
(llama-cpp-python, when ``--llamacpp-python`` exists: ``scripts/setup_llamacpp_venv.sh``). Results are merged into
``OUT/gguf.json`` (a rerun row replaces the stored one of the same type and quantizer; ``--fresh`` starts over),
and ``OUT/gguf.md`` shows them all, each with the run that measured it; ``--update-benchmarks`` puts the table into
BENCHMARKS.md. GGUF files and the importance matrix are written under ``--work`` and reused by later runs (``--work``
is not wiped): the F32 file unless ``--f32-row``, the importance matrix unless ``--new-imatrix``.

Usage:
    bash scripts/build_llamacpp_tools.sh      # once, not in CI
    bash scripts/setup_llamacpp_venv.sh       # once, not in CI
    python scripts/bench_gguf.py --out bench/gguf --update-benchmarks
    python scripts/bench_gguf.py --types Q4_0 Q4_K_M --rows llama.cpp-imatrix --update-benchmarks
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M", "Q3_K_M")
ROWS = ("hfquant-gptq", "hfquant-rtn", "llama.cpp", "llama.cpp-imatrix", "llama.cpp-imatrix-own-mix")
IMATRIX_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M")
F32_ROW = "hfquant export"


def _ppl_transformers(path: Path, ids, windows: int) -> float:
    import transformers

    from hfquant.eval.perplexity import perplexity

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return perplexity(model, None, ids, seq_len=512, max_windows=windows)


def _llamacpp(python: Path, *args) -> dict:
    out = subprocess.run([str(python), str(ROOT / "scripts" / "llamacpp_tool.py"), *map(str, args)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _types_in(path: Path) -> dict:
    return dict(Counter(_tensor_types(path).values()))


def _evaluate(row: dict, path: Path, ids, windows_file: Path, args) -> None:
    row["file_bytes"] = path.stat().st_size
    row["file_mib"] = path.stat().st_size / 2**20
    row["tensor_types"] = _types_in(path)
    if "transformers" in args.evaluators:
        row["ppl_transformers"] = _ppl_transformers(path, ids, args.windows)
    if "llama.cpp" in args.evaluators and args.llamacpp_python.exists():
        row["ppl_llamacpp"] = _llamacpp(args.llamacpp_python, "ppl", path, windows_file)["ppl"]
    print(json.dumps(row), flush=True)


def hfquant_accepts(kind: str) -> bool:
    """Whether this hfquant quantizes onto ``gguf_type=kind`` (another engineer may be adding types)."""
    from hfquant import HFQuantConfig

    try:
        HFQuantConfig(gguf_type=kind)
    except Exception as exc:  # ConfigError: the type is not (yet) one of hfquant's
        print(f"note: hfquant rows for {kind} skipped: {str(exc).splitlines()[0]}", flush=True)
        return False
    return True


def hfquant_row(kind: str, method: str, ids, windows_file: Path, work: Path, args) -> dict:
    import transformers

    from hfquant import HFQuantConfig
    from hfquant.eval.perplexity import perplexity
    from hfquant.formats.gguf import export_gguf

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=HFQuantConfig(gguf_type=kind, method=method))
    row = {"row": f"hfquant-{method}", "type": kind, "quant_seconds": time.perf_counter() - t0,
           "ppl_hfquant": perplexity(model, None, ids, seq_len=512, max_windows=args.windows)}
    folder = work / f"{method}-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(work / f"{method}-{kind}-gguf", ignore_errors=True)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(args.model).save_pretrained(folder)
    del model
    _evaluate(row, export_gguf(folder, work / f"{method}-{kind}-gguf"), ids, windows_file, args)
    return row


def _tool(args, name: str) -> Path:
    return args.llamacpp_bin / name


def llamacpp_quantize(f32: Path, out: Path, kind: str, args, imatrix: Path | None = None,
                      type_file: Path | None = None) -> dict:
    """llama.cpp's quantizer: ``llama-quantize`` (2 threads) where built, else llama-cpp-python's binding (plain only)."""
    out.unlink(missing_ok=True)
    if not _tool(args, "llama-quantize").exists():
        if imatrix is not None or type_file is not None:
            raise SystemExit(f"{_tool(args, 'llama-quantize')} is missing; run scripts/build_llamacpp_tools.sh")
        done = _llamacpp(args.llamacpp_python, "quantize", f32, out, kind)
        return {"quant_seconds": done["seconds"], "quantizer": f"llama_model_quantize (llama-cpp-python {done['llama_cpp_python']})"}
    cmd = [str(_tool(args, "llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if type_file is not None:
        cmd += ["--tensor-type-file", str(type_file)]
    cmd += [str(f32), str(out), kind, "2"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-quantize failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"quant_seconds": time.perf_counter() - t0, "quantizer": "llama-quantize (scripts/build_llamacpp_tools.sh)"}


def llamacpp_row(kind: str, f32: Path, ids, windows_file: Path, work: Path, args) -> dict:
    out = work / f"llamacpp-{kind}.gguf"
    row = {"row": "llama.cpp", "type": kind, **llamacpp_quantize(f32, out, kind, args)}
    _evaluate(row, out, ids, windows_file, args)
    return row


def imatrix_file(f32: Path, args) -> tuple[Path, dict]:
    """``llama-imatrix`` over the bundled WikiText-2 valid text (reused from ``--work`` unless ``--new-imatrix``)."""
    path = args.work / f"imatrix-c512-n{args.imatrix_chunks}.gguf"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists() and not args.new_imatrix:
        print(f"note: reusing {path}", flush=True)
        return path, json.loads(info_path.read_text())
    text = ROOT / "hfquant" / "data" / "wikitext2" / "valid.txt"
    cmd = [str(_tool(args, "llama-imatrix")), "-m", str(f32), "-f", str(text), "-c", "512",
           "--chunks", str(args.imatrix_chunks), "-t", "2", "-o", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (args.work / "imatrix.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not path.exists():
        raise SystemExit(f"llama-imatrix failed ({proc.returncode}); see {args.work / 'imatrix.log'}")
    info = {"imatrix_command": " ".join(["llama-imatrix", *cmd[1:]]).replace(str(ROOT) + "/", ""),
            "imatrix_seconds": time.perf_counter() - t0, "imatrix_chunks": args.imatrix_chunks}
    info_path.write_text(json.dumps(info))
    return path, info


def imatrix_rows(kind: str, f32: Path, ids, windows_file: Path, wanted: set, args) -> list[dict]:
    """``llama.cpp-imatrix`` (tensor types forced to the plain row's where they differ) and/or
    ``llama.cpp-imatrix-own-mix`` (llama.cpp's own choice with an importance matrix)."""
    imatrix, info = imatrix_file(f32, args)
    own = args.work / f"llamacpp-imatrix-own-{kind}.gguf"
    q = llamacpp_quantize(f32, own, kind, args, imatrix=imatrix)
    plain = args.work / f"llamacpp-plain-types-{kind}.gguf"
    llamacpp_quantize(f32, plain, kind, args)
    want, got = _tensor_types(plain), _tensor_types(own)
    forced = {n: f"{got[n]} -> {t}" for n, t in want.items() if got.get(n) != t}
    rows = []
    if "llama.cpp-imatrix-own-mix" in wanted:
        if forced or "llama.cpp-imatrix" not in wanted:
            row = {"row": "llama.cpp-imatrix-own-mix", "type": kind, **q, **info}
            _evaluate(row, own, ids, windows_file, args)
            rows.append(row)
        else:
            print(f"note: {kind}: llama.cpp's imatrix mix is the plain mix; no separate own-mix row", flush=True)
    if "llama.cpp-imatrix" not in wanted:
        return rows
    out = own
    if forced:
        type_file = args.work / f"tensor-types-{kind}.txt"
        # every quantized tensor, not only the differing ones: llama.cpp counts the ffn_down tensors it chooses a
        # type for, so forcing the first ones moves its "more bits" choice onto the next ones
        type_file.write_text("".join(f"^{n.replace('.', chr(92) + '.')}$={t.lower()}\n" for n, t in want.items()
                                     if t not in ("F32", "F16", "BF16")))
        out = args.work / f"llamacpp-imatrix-{kind}.gguf"
        q = llamacpp_quantize(f32, out, kind, args, imatrix=imatrix, type_file=type_file)
        left = {n: t for n, t in _tensor_types(out).items() if want.get(n) != t}
        if left:
            raise SystemExit(f"llama-quantize --tensor-type-file did not set the types of {sorted(left)}")
    row = {"row": "llama.cpp-imatrix", "type": kind, **q, **info, "forced_types": forced}
    _evaluate(row, out, ids, windows_file, args)
    rows.append(row)
    return rows


def _order(row: dict) -> tuple:
    t = row["type"]
    return (t != "F32", TYPES.index(t) if t in TYPES else len(TYPES), t,
            ROWS.index(row["row"]) if row["row"] in ROWS else len(ROWS))


def merge(old: dict | None, meta: dict, new_rows: list[dict]) -> dict:
    """Stored results with ``new_rows`` in place of the stored rows of the same type and quantizer; each row keeps
    the index of the run (``runs``: command, machine, versions, date) that measured it."""
    runs, rows = [], []
    if old is not None:
        runs = old.get("runs") or [old["meta"]]
        rows = [{**r, "run": r.get("run", 0)} for r in old["rows"]]
    keys = {(r["type"], r["row"]) for r in new_rows}
    rows = [r for r in rows if (r["type"], r["row"]) not in keys]
    runs.append({k: v for k, v in meta.items() if k not in ("fp32_ppl", "n_params")})
    rows += [{**r, "run": len(runs) - 1} for r in new_rows]
    used = sorted({r["run"] for r in rows})
    renumber = {old_i: i for i, old_i in enumerate(used)}
    return {"meta": meta, "runs": [runs[i] for i in used],
            "rows": sorted(({**r, "run": renumber[r["run"]]} for r in rows), key=_order)}


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    lines = []
    for i, run in enumerate(runs):
        lines.append(f"Run {i + 1}: `{run['command']}` — {run['machine']}; torch {run['torch']}, "
                     f"transformers {run['transformers']}; {run['threads']} threads; {run['date']}  ")
    lines += ["", f"Float model: PPL-16K {meta['fp32_ppl']:.2f} (hfquant's evaluation of the float32 checkpoint).", "",
              "| type | quantizer | PPL-16K (hfquant) | PPL-16K (transformers GGUF) | PPL-16K (llama.cpp) | file (MiB) | "
              "bits/weight | quantization (s) | tensor types | run |",
              "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v):
        return "—" if v is None else f"{v:.2f}"
    for r in data["rows"]:
        bpw = r["file_mib"] * 2**20 * 8 / meta["n_params"]
        types = ", ".join(f"{k}: {v}" for k, v in sorted(r["tensor_types"].items()))
        lines.append(f"| {r['type']} | {r['row']} | {fmt(r.get('ppl_hfquant'))} | {fmt(r.get('ppl_transformers'))} | "
                     f"{fmt(r.get('ppl_llamacpp'))} | {r['file_mib']:.1f} | {bpw:.2f} | {r['quant_seconds']:.1f} | "
                     f"{types} | {r['run'] + 1} |")
    return "\n".join(lines) + "\n"


def _planned(args) -> list[tuple[str, str]]:
    """(type, row) pairs of this run, in order."""
    out = []
    for kind in args.types:
        for row in args.rows or ROWS[:4]:
            if args.rows is None and row == "llama.cpp-imatrix" and kind not in IMATRIX_TYPES:
                continue
            out.append((kind, row))
    return out


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gguf")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hfquant-bench-gguf"),
                        help="GGUF files and the importance matrix (large; not wiped between runs)")
    parser.add_argument("--types", nargs="*", default=list(TYPES))
    parser.add_argument("--rows", nargs="*", choices=ROWS,
                        help=f"quantizers to run (default: all but the own-mix row; imatrix only for {IMATRIX_TYPES})")
    parser.add_argument("--f32-row", action="store_true", help="evaluate the F32 file again (always on a fresh table)")
    parser.add_argument("--fresh", action="store_true", help="do not merge into the stored OUT/gguf.json")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--evaluators", nargs="*", choices=["transformers", "llama.cpp"],
                        default=["transformers", "llama.cpp"], help="who evaluates the GGUF files (hfquant rows are "
                        "always evaluated by hfquant too)")
    parser.add_argument("--imatrix-chunks", type=int, default=128)
    parser.add_argument("--new-imatrix", action="store_true", help="compute the importance matrix again")
    parser.add_argument("--llamacpp-python", type=Path, default=ROOT / ".venv-llamacpp" / "bin" / "python")
    parser.add_argument("--llamacpp-bin", type=Path, default=ROOT / "build" / "llamacpp" / "bin")
    parser.add_argument("--update-benchmarks", action="store_true")
    return parser.parse_args(argv)


def run_rows(plan, f32: Path, ids, windows_file: Path, args, save) -> list[dict]:
    rows, accepted = [], {}
    have_tools = _tool(args, "llama-quantize").exists() and _tool(args, "llama-imatrix").exists()
    for kind, name in plan:
        if name.startswith("hfquant-"):
            if accepted.setdefault(kind, hfquant_accepts(kind)):
                rows.append(hfquant_row(kind, name.removeprefix("hfquant-"), ids, windows_file, args.work, args))
        elif name == "llama.cpp":
            if have_tools or args.llamacpp_python.exists():
                rows.append(llamacpp_row(kind, f32, ids, windows_file, args.work, args))
        elif name == "llama.cpp-imatrix-own-mix" and (kind, "llama.cpp-imatrix") in plan:
            continue  # made together with llama.cpp-imatrix below
        elif have_tools:
            wanted = {name} | {n for k, n in plan if k == kind and n.startswith("llama.cpp-imatrix")}
            rows += imatrix_rows(kind, f32, ids, windows_file, wanted, args)
        else:
            print(f"note: {name} {kind} skipped: no {args.llamacpp_bin}/llama-imatrix; run scripts/build_llamacpp_tools.sh")
        save(rows)
    return rows


def main(argv=None) -> None:
    args = _parse(argv)

    import torch
    import transformers

    from hfquant.eval.perplexity import _ids, perplexity
    from hfquant.formats.gguf import export_gguf
    from scripts.bench_accuracy import update_benchmarks
    from scripts.timing import run_meta

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stored = args.out / "gguf.json"
    old = None if args.fresh or not stored.exists() else json.loads(stored.read_text())
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = _ids((ROOT / "hfquant" / "data" / "wikitext2" / "test.txt").read_text(), tok, 512)
    windows_file = args.work / "windows.json"
    windows_file.write_text(json.dumps([ids[k * 512:(k + 1) * 512].tolist() for k in range(args.windows)]))
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    meta = {**run_meta("bench_gguf.py", argv), "n_params": sum(p.numel() for p in fp32.parameters()),
            "llama_cpp_python": args.llamacpp_python.exists(), "load_before": os.getloadavg()}
    f32_again = args.f32_row or old is None
    meta["fp32_ppl"] = (perplexity(fp32, None, ids, seq_len=512, max_windows=args.windows) if f32_again
                        else old["meta"]["fp32_ppl"])
    del fp32
    f32 = args.work / "f32" / "model.gguf"
    if f32_again or not f32.exists():  # else the F32 file of an earlier run (the export is deterministic)
        shutil.rmtree(args.work / "f32", ignore_errors=True)
        f32 = export_gguf(args.model, args.work / "f32", float_type="F32")
    rows = []
    if f32_again:
        rows.append({"row": F32_ROW, "type": "F32", "quant_seconds": 0.0})
        _evaluate(rows[0], f32, ids, windows_file, args)

    def save(new):
        meta["load_after"] = os.getloadavg()
        data = merge(old, meta, rows + new)
        stored.write_text(json.dumps(data, indent=2))
        return data
    rows += run_rows(_planned(args), f32, ids, windows_file, args, save)
    data = save([])
    md = markdown(data)
    (args.out / "gguf.md").write_text(md)
    print(md)
    if args.update_benchmarks:
        update_benchmarks(md, marker="gguf")


if __name__ == "__main__":
    main()
