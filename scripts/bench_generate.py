"""End-to-end speed on this CPU: SmolLM2-135M tokens/s, fp32 vs W4A16 (float or int8 head) vs W8A8, as ratios from one run.

* the eager decode and prefill runs of the models take turns (fp32, W4A16, W4A16 + int8 head, W8A8, fp32, ...), so a slow
  spell of the machine does not fall on one model; medians of ``--repeats`` (5) runs.
* decode: batch 1, a 16-token prompt, 128 new tokens, greedy (``generate`` with ``min_new_tokens`` so
  every run makes exactly 128 tokens); tokens/s = 128 / wall time of the whole ``generate`` call.
* prefill: one forward pass over 1 x 512 tokens; tokens/s = 512 / wall time.
* compiled decode (unless ``--no-compile``): each model's ``forward`` under ``torch.compile(fullgraph=True,
  dynamic=False)`` with a static KV cache (``cache_implementation="static"``), the same settings for every
  model; hfquant's kernels are torch operators, so the graph calls them without a break. The first
  ``generate`` (compilation) is not timed; its time is reported as ``compile s``.
* where a decoded token's time goes: ``--repeats`` more ``generate`` runs (medians) with a clock around every Linear of the
  decoder layers (float ``nn.Linear`` in fp32, the quantized modules otherwise) and around ``lm_head``;
  "rest" is the remainder (embedding, norms, attention, rotary, cache updates, ``generate``'s own loop),
  the same work in every model. The clocks add about a microsecond per call, so this run is a little
  slower than the timed decode; its columns are per token.

Models: the fp32 reference; W4A16 = RTN 4-bit g128 sym (the same kernel path and layout as a GPTQ
g128 checkpoint: speed does not depend on how the codes were chosen); W4A16 + int8 head = the same with
``lm_head_bits: 8`` (the tied ``lm_head`` untied and rounded to 8-bit codes per channel; opt-in); W8A8 = int8
weights per channel, dynamic per-token int8 activations (SmoothQuant without smoothing; smoothing does not
change speed). The embedding stays float32 in every model. ``lm_head`` (column "lm_head stored as") stays float32,
except in the int8-head row and where its float32 values are exactly bf16 (``--synthetic``'s default weights, as in a
model loaded from a bf16 checkpoint): the quantized models then hold it in bf16 (``HalfStoredLinear``: the same values,
float32 arithmetic), and a "w4a16, float32 head" row (``HFQUANT_HEAD_16BIT=0``) shows the W4A16 model without that.
The "w4a16, timed paths (opt-in)" row is the W4A16 model again with ``HFQUANT_CPU_PREFILL=fastest`` and
``HFQUANT_CPU_HALF=fastest``: the old default, the fastest CPU path per shape class by a timing, whose numbers can
differ from process to process; the other rows run the reproducible default (README, Kernels).

Writes ``OUT/generate.json`` and ``.md``; ``--update-benchmarks`` puts the table in BENCHMARKS.md.

Usage:
    python scripts/bench_generate.py --out bench --update-benchmarks
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.timing import (  # noqa: E402
    interleaved_median_seconds,
    median_seconds,
    rerun_as_isa,
    run_meta,
    save_table,
    table_header,
)


# Models built from a config (random weights, seeded): speed does not depend on the weights' values. SmolLM2's
# vocabulary size, so its tokenizer (saved with the model) serves the W8A8 model's calibration.
SYNTHETIC = {"llama7b-2layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                     max_position_embeddings=4096, tie_word_embeddings=False)}


def synthetic_model(name: str, tokenizer_from: str, bf16_values: bool) -> str:
    """Build ``SYNTHETIC[name]`` (float32, seed 0; with ``bf16_values`` every weight rounded to bf16 once, as in a
    float32 model loaded from a bf16 checkpoint) and save it with ``tokenizer_from``'s tokenizer to a temporary
    folder; returns the folder."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SYNTHETIC[name]))
    if bf16_values:
        model = model.to(torch.bfloat16).float()  # as a float32 model loaded from a bf16 checkpoint
    folder = tempfile.mkdtemp(prefix=f"hfquant-{name}-")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def load_models(path: str) -> dict:
    """The models of the table. Where the W4A16 model's float32 head is exactly 16-bit (a model from a bf16
    checkpoint: hfquant then stores it in 16 bits, ``HalfStoredLinear``), a second W4A16 model keeps the float32
    head (``HFQUANT_HEAD_16BIT=0``), so the table shows both."""
    import os

    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig
    from hfquant.nn import HalfStoredLinear

    small = dict(num_samples=8, seq_len=128)  # calibration size does not change the kernels' speed
    w4a16 = HFQuantConfig(method="rtn", group_size=128)
    models = {
        "fp32": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        "w4a16": AutoModelForCausalLM.from_pretrained(path, quantization_config=w4a16),
    }
    if isinstance(models["w4a16"].lm_head, HalfStoredLinear):
        os.environ["HFQUANT_HEAD_16BIT"] = "0"
        try:
            models["w4a16, float32 head"] = AutoModelForCausalLM.from_pretrained(path, quantization_config=w4a16)
        finally:
            del os.environ["HFQUANT_HEAD_16BIT"]
    models["w4a16 + int8 head"] = AutoModelForCausalLM.from_pretrained(path, quantization_config=HFQuantConfig(
        method="rtn", group_size=128, lm_head_bits=8))
    models["w8a8"] = AutoModelForCausalLM.from_pretrained(path, quantization_config=HFQuantConfig(
        method="smoothquant", alpha=None, **small))
    return models


# Rows that run another model of the table under environment variables: the same W4A16 model with the timed CPU path
# choices (opt-in; the default is the reproducible rule, whose numbers are the same in every process).
ENV_ROWS = {"w4a16, timed paths (opt-in)": ("w4a16", {"HFQUANT_CPU_PREFILL": "fastest", "HFQUANT_CPU_HALF": "fastest"})}


@contextlib.contextmanager
def environment(env: dict):
    """Set ``env`` for the block, then restore what was there."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def head_storage(model) -> str:
    """How the model's output head holds its weight: float32, bf16/fp16 (exact, ``HalfStoredLinear``) or int8."""
    head = model.lm_head
    if hasattr(head, "bits"):
        return f"int{head.bits}"
    dtype = str(head.weight.dtype).removeprefix("torch.")
    return {"bfloat16": "bf16 (exact)", "float16": "fp16 (exact)", "float32": "fp32"}.get(dtype, dtype)


def decode_breakdown(model, prompt, n: int, repeats: int) -> dict:
    """Milliseconds per decoded token in the decoder layers' Linears, in ``lm_head``, and the rest: the
    median of each over ``repeats`` clocked decode runs."""
    spent = {"linears": 0.0, "lm_head": 0.0}
    patched = []

    def clock(module, key):
        forward = module.forward

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            spent[key] += time.perf_counter() - t0
            return out
        module.forward = timed
        patched.append(module)

    from hfquant.nn.weight_only import QuantLinearWeightOnly
    from hfquant.nn.w8a8 import QuantLinearW8A8

    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, (torch.nn.Linear, QuantLinearWeightOnly, QuantLinearW8A8)):
                clock(module, "linears")
    clock(model.lm_head, "lm_head")
    runs = []
    try:
        with torch.no_grad():
            for _ in range(repeats):
                spent.update(linears=0.0, lm_head=0.0)
                t0 = time.perf_counter()
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                total = time.perf_counter() - t0
                runs.append({"linears": spent["linears"], "lm_head": spent["lm_head"],
                             "rest": total - spent["linears"] - spent["lm_head"]})
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
    return {k: statistics.median(r[k] for r in runs) / n * 1e3 for k in runs[0]}


def markdown(meta: dict, how: str, columns: list[str], rows: list[list[str]]) -> str:
    """A table under the shared command and machine lines (``table_header``) and a line saying how it was
    measured."""
    lines = [*table_header(meta), how, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def compiled_decode(models: dict, prompt, n: int, repeats: int) -> list[dict]:
    """Decode tokens/s of every model with its forward compiled (static KV cache); speedups against the compiled
    fp32 model."""
    rows = []
    for name, model in models.items():
        torch._dynamo.reset()  # one model's graphs at a time: no guard checks against the others' entries
        eager_forward = model.forward
        model.forward = torch.compile(eager_forward, fullgraph=True, dynamic=False)

        def run(m=model):
            return m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              cache_implementation="static")
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                run()  # compiles the prefill and the decode step
            first = time.perf_counter() - t0
            decode_s = median_seconds(run, repeats, warmup=1)
        finally:
            model.forward = eager_forward
        rows.append({"model": name, "compiled_decode_tok_s": n / decode_s, "compiled_decode_ms_per_token": decode_s / n * 1e3,
                     "compile_s": first - decode_s})
        print(f"{name} compiled: decode {n / decode_s:.1f} tok/s", flush=True)
    torch._dynamo.reset()
    for r in rows:
        r["compiled_decode_speedup"] = r["compiled_decode_tok_s"] / rows[0]["compiled_decode_tok_s"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--update-benchmarks", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-decode table")
    parser.add_argument("--synthetic", choices=list(SYNTHETIC),
                        help="instead of --model: a randomly initialised model built from a config (e.g. two Llama-2-7B "
                             "layers), saved to a temporary folder")
    parser.add_argument("--synthetic-values", choices=["bf16", "float32"], default="bf16",
                        help="--synthetic's weights: bf16 values in float32 (as loaded from a bf16 checkpoint, how Llama "
                             "checkpoints ship; the default) or plain float32 random values")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: run as on an AVX2-only CPU (torch's AVX2 code, hfquant's AVX2 build; emulated)")
    args = parser.parse_args(argv)
    if rerun_as_isa(args.isa, argv):
        return
    suffix = "" if args.isa == "native" else f"-{args.isa}"
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"error: no model at {args.model}; run `python scripts/prepare_reference_model.py --out models` first")
    if args.synthetic:
        args.model = synthetic_model(args.synthetic, args.model, args.synthetic_values == "bf16")
        suffix = f"-{args.synthetic}{'' if args.synthetic_values == 'bf16' else '-float32-values'}{suffix}"
    models = load_models(args.model)
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, 16), generator=gen)
    long = torch.randint(0, vocab, (1, 512), generator=gen)
    n = args.new_tokens
    for model in models.values():
        model.eval()
    envs = {name: {} for name in models}
    for row, (of, env) in ENV_ROWS.items():
        models[row], envs[row] = models[of], env

    def under(name, fn):
        def run():
            with environment(envs[name]):
                return fn()
        return run
    decode = interleaved_median_seconds({name: under(name, lambda m=model: m.generate(
        prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)) for name, model in models.items()},
        args.repeats)
    prefill = interleaved_median_seconds({name: under(name, lambda m=model: m(input_ids=long))
                                          for name, model in models.items()}, args.repeats)
    rows = []
    for name, model in models.items():
        decode_s, prefill_s = decode[name], prefill[name]
        with environment(envs[name]):
            split = decode_breakdown(model, prompt, n, args.repeats)
        rows.append({"model": name, "head": head_storage(model), "decode_tok_s": n / decode_s, "prefill_tok_s": 512 / prefill_s,
                     "decode_ms_per_token": decode_s / n * 1e3, **{f"{k}_ms_per_token": v for k, v in split.items()}})
        print(f"{name}: decode {n / decode_s:.1f} tok/s, prefill {512 / prefill_s:.1f} tok/s", flush=True)
    base = rows[0]
    for r in rows:
        r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_speedup"] = r["prefill_tok_s"] / base["prefill_tok_s"]
    meta = {**run_meta("bench_generate.py", argv), "repeats": args.repeats}
    md = markdown(meta, f"Median of {args.repeats} runs, the models taking turns in each. Decode: batch 1, "
                  f"16-token prompt, {n} new tokens (greedy); prefill: 1 x 512 tokens. The last three columns split a "
                  f"decoded token's time: medians of {args.repeats} more decode runs with a clock around each decoder "
                  "Linear and lm_head (so they add up to a little more than decode ms/token); rest = embedding, norms, "
                  "attention, cache and generate's loop.",
                  ["model", "lm_head stored as", "decode tok/s", "decode speedup", "prefill tok/s", "prefill speedup", "decode ms/token",
                   "of which: layers' Linears", "lm_head", "rest"],
                  [[r["model"], r["head"], f"{r['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}x", f"{r['prefill_tok_s']:.1f}",
                    f"{r['prefill_speedup']:.2f}x", f"{r['decode_ms_per_token']:.1f}", f"{r['linears_ms_per_token']:.1f}",
                    f"{r['lm_head_ms_per_token']:.1f}", f"{r['rest_ms_per_token']:.1f}"] for r in rows])
    save_table(args.out, "generate" + suffix, meta, rows, md, "generate" + suffix if args.update_benchmarks else None)
    if args.no_compile:
        return
    compiled = compiled_decode({k: v for k, v in models.items() if k not in ENV_ROWS}, prompt, n, args.repeats)
    eager = {r["model"]: r for r in rows}
    md = markdown(meta, f"Median of {args.repeats} runs after one untimed. Decode: batch 1, 16-token "
                  f"prompt, {n} new tokens (greedy), each model's forward compiled with `torch.compile(fullgraph=True, "
                  "dynamic=False)` and a static KV cache; speedup against the compiled fp32 model; compile s = the first "
                  "(compiling) run's time less a timed run's.",
                  ["model", "compiled decode tok/s", "speedup vs compiled fp32", "eager decode tok/s (table above)",
                   "compiled ms/token", "compile s"],
                  [[r["model"], f"{r['compiled_decode_tok_s']:.1f}", f"{r['compiled_decode_speedup']:.2f}x",
                    f"{eager[r['model']]['decode_tok_s']:.1f}", f"{r['compiled_decode_ms_per_token']:.1f}",
                    f"{r['compile_s']:.0f}"] for r in compiled])
    save_table(args.out, "generate_compiled" + suffix, meta, compiled, md,
               "generate-compiled" + suffix if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
