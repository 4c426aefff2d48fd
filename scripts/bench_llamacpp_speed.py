"""llama.cpp's own speed on this CPU for SmolLM2-135M Q4_K_M next to hfquant's W4A16 in transformers, one run.

* llama.cpp: ``llama-bench`` of each ``--llamacpp-bin`` build (``scripts/build_llamacpp_tools.sh``: the generic
  x86-64 AVX2 build, and with ``NATIVE=1`` llama.cpp's default ``-march=native`` build, AVX-512/VNNI here) on a Q4_K_M
  GGUF of SmolLM2-135M, ``-t 2 -p 512 -n 128 -r REPEATS``: prompt processing of 512 tokens and generation of 128
  tokens (from an empty context), mean tokens/s over the repeats as llama-bench reports them. The GGUF is
  ``--gguf`` (default: llama.cpp's own Q4_K_M of the float model from ``scripts/bench_gguf.py``'s work folder,
  made here when missing; speed depends on the tensor types, which every quantizer of the type shares, not on the
  codes).
* hfquant: the W4A16 g128 checkpoint (``--ckpt``, default ``models/ckpt/gptq-w4-g128``) and the float32 model,
  measured as ``scripts/bench_generate.py`` measures them (its functions): decode = ``generate`` of 128 new tokens
  (greedy, batch 1, a 16-token prompt), tokens/s = 128 / wall time; prefill = one forward pass over 1 x 512 tokens;
  medians of ``REPEATS`` runs, the models taking turns. 2 torch threads.

The machine's load average (``os.getloadavg``) is recorded before and after each engine: numbers measured while
other processes ran on the same cores are not valid speed numbers; rerun the script on a quiet machine.

Writes ``OUT/llamacpp_speed.json`` and ``.md``; ``--update-benchmarks`` puts the table into BENCHMARKS.md (marker
``gguf-speed``).

Usage:
    bash scripts/build_llamacpp_tools.sh       # once, not in CI
    python scripts/bench_llamacpp_speed.py --out bench/gguf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.timing import interleaved_median_seconds, run_meta, save_table, table_header  # noqa: E402


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def q4km_gguf(args) -> Path:
    """``--gguf``, else llama.cpp's Q4_K_M of the float model in ``--work`` (quantized here when missing)."""
    if args.gguf is not None:
        return args.gguf
    out = args.work / "llamacpp-Q4_K_M.gguf"
    if out.exists():
        return out
    from hfquant.formats.gguf import export_gguf

    f32 = args.work / "f32" / "model.gguf"
    if not f32.exists():
        f32 = export_gguf(args.model, args.work / "f32", float_type="F32")
    subprocess.run([str(args.llamacpp_bin[0] / "llama-quantize"), str(f32), str(out), "Q4_K_M", "2"], check=True,
                   capture_output=True)
    return out


def llama_bench(path: Path, args, bin_dir: Path) -> dict:
    """``llama-bench`` prompt 512 and generation 128 on ``args.threads`` threads: tokens/s (mean, stddev)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(args.threads), "-p", "512",
           "-n", str(args.new_tokens), "-r", str(args.repeats), "-o", "json"]
    before = _load()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    tests = json.loads(proc.stdout)
    out = {"command": " ".join(["llama-bench", *cmd[1:]]).replace(str(ROOT) + "/", ""), "load_before": before,
           "load_after": _load(), "build": tests[0].get("build_commit"), "cpu": tests[0].get("cpu_info")}
    for t in tests:
        key = "prefill" if t["n_prompt"] and not t["n_gen"] else "decode"
        out[f"{key}_tok_s"], out[f"{key}_tok_s_stddev"] = t["avg_ts"], t["stddev_ts"]
    return out


def hfquant_speed(args) -> dict:
    """Decode and prefill tokens/s of the float32 model and the W4A16 checkpoint, as bench_generate measures them."""
    import hfquant  # noqa: F401  (registers the checkpoint's quant_method with transformers)
    from transformers import AutoModelForCausalLM

    models = {"fp32": AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
              "w4a16": AutoModelForCausalLM.from_pretrained(args.ckpt)}
    gen = torch.Generator().manual_seed(0)
    vocab = models["fp32"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, 16), generator=gen)
    long = torch.randint(0, vocab, (1, 512), generator=gen)
    n = args.new_tokens
    for m in models.values():
        m.eval()
    before = _load()
    decode = interleaved_median_seconds({k: (lambda m=m: m.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                                                    do_sample=False, pad_token_id=0))
                                         for k, m in models.items()}, args.repeats)
    prefill = interleaved_median_seconds({k: (lambda m=m: m(input_ids=long)) for k, m in models.items()}, args.repeats)
    return {k: {"decode_tok_s": n / decode[k], "prefill_tok_s": 512 / prefill[k], "load_before": before,
                "load_after": _load()} for k in models}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [*table_header(meta),
             f"Load average (1, 5, 15 min) at the start: {meta['load_start']}; at the end: {meta['load_end']}. "
             "Numbers measured at a load above the 2 cores' own work are not valid speed numbers.", "",
             "| engine | model | prefill 512 tok/s | decode 128 tok/s | how |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['model']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['how']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--ckpt", default=str(ROOT / "models" / "ckpt" / "gptq-w4-g128"))
    parser.add_argument("--gguf", type=Path, help="the Q4_K_M file llama-bench runs (default: see the docstring)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hfquant-bench-gguf"))
    # the native build (NATIVE=1) only when asked: on this project's KVM Xeon its llama-bench dies with SIGILL
    parser.add_argument("--llamacpp-bin", type=Path, nargs="+", default=[ROOT / "build" / "llamacpp" / "bin"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gguf")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--update-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    for b in args.llamacpp_bin:
        if not (b / "llama-bench").exists():
            sys.exit(f"error: no {b / 'llama-bench'}; run scripts/build_llamacpp_tools.sh first")
    if not Path(args.ckpt, "config.json").is_file():
        sys.exit(f"error: no checkpoint at {args.ckpt}")
    torch.set_num_threads(args.threads)
    start = _load()
    gguf = q4km_gguf(args)
    benches = {b: llama_bench(gguf, args, b) for b in args.llamacpp_bin}
    hf = hfquant_speed(args)
    meta = {**run_meta("bench_llamacpp_speed.py", argv), "repeats": args.repeats, "load_start": start,
            "load_end": _load(), "gguf": str(gguf), "file_mib": gguf.stat().st_size / 2**20}
    rows = [*({"engine": f"llama.cpp (llama-bench, {'native' if 'native' in str(b) else 'AVX2'} build)",
               "model": f"Q4_K_M GGUF ({meta['file_mib']:.1f} MiB)",
               "how": f"`{lb['command']}`: mean of {args.repeats}; decode from an empty context", **lb}
              for b, lb in benches.items()),
            *({"engine": "hfquant in transformers", "model": "W4A16 g128 (GPTQ checkpoint)" if k == "w4a16" else "float32",
               "how": f"median of {args.repeats}, models taking turns; decode after a 16-token prompt (bench_generate.py)",
               **v} for k, v in hf.items())]
    save_table(args.out, "llamacpp_speed", meta, rows, markdown(meta, rows),
               marker="gguf-speed" if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
