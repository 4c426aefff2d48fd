"""GGUF benchmark on SmolLM2-135M: hfquant's GPTQ (and RTN) on GGUF grids against llama.cpp's own quantizer.

For each type (default Q4_0, Q4_1, Q8_0, Q4_K_M):

* ``hfquant-gptq``: ``from_pretrained(..., HFQuantConfig(gguf_type=T))`` (calibration 128 x 512 tokens of WikiText-2
  valid, the defaults), saved, exported with ``hfquant export --format gguf``;
* ``hfquant-rtn``: the same grid rounded to nearest (``method: rtn``);
* ``llama.cpp``: llama.cpp's ``llama_model_quantize`` of the float model (an F32 GGUF written by hfquant's
  exporter) to the same type, no importance matrix (llama-cpp-python's binding takes one only as a C pointer).

Each file is evaluated on PPL-16K (WikiText-2 test, first 32 windows of 512 tokens): by hfquant (its own model,
hfquant rows only), by transformers' GGUF loader (``gguf_file=``, de-quantized to float32), and by llama.cpp
(llama-cpp-python, when ``--llamacpp-python`` exists: ``scripts/setup_llamacpp_venv.sh``). Writes ``OUT/gguf.json``
and ``OUT/gguf.md``; ``--update-benchmarks`` puts the table into BENCHMARKS.md.

Usage:
    bash scripts/setup_llamacpp_venv.sh     # once, not in CI
    python scripts/bench_gguf.py --out bench/gguf --update-benchmarks
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M")


def _ppl_transformers(path: Path, ids, windows: int) -> float:
    import transformers

    from hfquant.eval.perplexity import perplexity

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return perplexity(model, None, ids, seq_len=512, max_windows=windows)


def _llamacpp(python: Path, *args) -> dict:
    out = subprocess.run([str(python), str(ROOT / "scripts" / "llamacpp_tool.py"), *map(str, args)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _types_in(path: Path) -> dict:
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def _evaluate(row: dict, path: Path, ids, windows_file: Path, args) -> None:
    row["file_mib"] = path.stat().st_size / 2**20
    row["tensor_types"] = _types_in(path)
    row["ppl_transformers"] = _ppl_transformers(path, ids, args.windows)
    if args.llamacpp_python.exists():
        row["ppl_llamacpp"] = _llamacpp(args.llamacpp_python, "ppl", path, windows_file)["ppl"]
    print(json.dumps(row), flush=True)


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
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(args.model).save_pretrained(folder)
    del model
    _evaluate(row, export_gguf(folder, work / f"{method}-{kind}-gguf"), ids, windows_file, args)
    return row


def llamacpp_row(kind: str, f32: Path, ids, windows_file: Path, work: Path, args) -> dict:
    out = work / f"llamacpp-{kind}.gguf"
    done = _llamacpp(args.llamacpp_python, "quantize", f32, out, kind)
    row = {"row": "llama.cpp", "type": kind, "quant_seconds": done["seconds"]}
    _evaluate(row, out, ids, windows_file, args)
    return row


def markdown(rows: list[dict], meta: dict, n_params: int) -> str:
    from scripts.timing import table_header

    lines = [*table_header(meta),
             f"Float model: PPL-16K {meta['fp32_ppl']:.2f} (hfquant's evaluation of the float32 checkpoint).",
             "",
             "| type | quantizer | PPL-16K (hfquant) | PPL-16K (transformers GGUF) | PPL-16K (llama.cpp) | file (MiB) | "
             "bits/weight | quantization (s) | tensor types |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v):
        return "—" if v is None else f"{v:.2f}"
    for r in rows:
        bpw = r["file_mib"] * 2**20 * 8 / n_params
        types = ", ".join(f"{k}: {v}" for k, v in sorted(r["tensor_types"].items()))
        lines.append(f"| {r['type']} | {r['row']} | {fmt(r.get('ppl_hfquant'))} | {fmt(r['ppl_transformers'])} | "
                     f"{fmt(r.get('ppl_llamacpp'))} | {r['file_mib']:.1f} | {bpw:.2f} | {r['quant_seconds']:.1f} | {types} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gguf")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hfquant-bench-gguf"))
    parser.add_argument("--types", nargs="*", default=list(TYPES))
    parser.add_argument("--methods", nargs="*", default=["gptq", "rtn", "llamacpp"])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--llamacpp-python", type=Path, default=ROOT / ".venv-llamacpp" / "bin" / "python")
    parser.add_argument("--update-benchmarks", action="store_true")
    args = parser.parse_args(argv)

    import shutil

    import torch
    import transformers

    from hfquant.eval.perplexity import _ids, perplexity
    from hfquant.formats.gguf import export_gguf
    from scripts.timing import run_meta, save_table

    torch.set_num_threads(2)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    text = (ROOT / "hfquant" / "data" / "wikitext2" / "test.txt").read_text()
    ids = _ids(text, tok)
    windows_file = args.work / "windows.json"
    windows_file.write_text(json.dumps([ids[k * 512:(k + 1) * 512].tolist() for k in range(args.windows)]))
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    n_params = sum(p.numel() for p in fp32.parameters())
    meta = {**run_meta("bench_gguf.py", argv), "fp32_ppl": perplexity(fp32, None, ids, seq_len=512, max_windows=args.windows),
            "llama_cpp": args.llamacpp_python.exists()}
    del fp32
    f32 = export_gguf(args.model, args.work / "f32", float_type="F32")
    f32_row = {"row": "hfquant export", "type": "F32", "quant_seconds": 0.0}
    _evaluate(f32_row, f32, ids, windows_file, args)
    rows = [f32_row]
    for kind in args.types:
        for method in args.methods:
            if method == "llamacpp":
                if args.llamacpp_python.exists():
                    rows.append(llamacpp_row(kind, f32, ids, windows_file, args.work, args))
            else:
                rows.append(hfquant_row(kind, method, ids, windows_file, args.work, args))
            (args.out / "gguf.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    save_table(args.out, "gguf", meta, rows, markdown(rows, meta, n_params),
               marker="gguf" if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
