"""ONNX Runtime benchmark on SmolLM2-135M: hfquant's W4 g128 export against ONNX Runtime's own 4-bit quantizers.

Rows (``--rows``; results merge into ``OUT/onnx.json`` so rows can be run separately):

* ``hfquant``: the hfquant checkpoint (``--checkpoint``, default the offline default recipe's GPTQ W4 g128 sym)
  in transformers on hfquant's CPU kernels: PPL-16K by ``hfquant.eval.perplexity``, the speed baseline;
* ``hfquant-onnx``: ``hfquant export --format onnx`` of that checkpoint (MatMulNBits, accuracy_level 1: float32
  activations); ``hfquant-onnx-acc4``: the same with accuracy_level 4 (int8 activations inside MatMulNBits);
* ``ort-float``: onnxruntime-genai's builder on the float model, fp32 (the ONNX float baseline);
* ``ort-rtn``: the builder's own int4 (``MatMulNBitsQuantizer``'s default RTN), block 128, symmetric;
  ``ort-kquant``: its ``k_quant`` mode, the same block;
* ``hfquant-w8a8`` / ``hfquant-onnx-w8a8``: the SmoothQuant W8A8 checkpoint (``--w8a8-checkpoint``) on hfquant's
  kernels and exported to ONNX (per-token int8 activations, ``MatMulInteger``);
* ``ort-gptq``: ``MatMulNBitsQuantizer`` with ``GPTQWeightOnlyQuantConfig`` (block 128, symmetric, damp 0.01,
  no act-order: its default) on the fp32 ONNX model, calibrated on ``--calibration`` windows x 512 tokens of the
  bundled WikiText-2 valid (seed 0: the first windows hfquant draws). Its calibration runs the whole model once per
  window for each distinct MatMul input (120 here), so 128 windows would take hours on 2 cores;
* ``hfquant-cal`` / ``hfquant-onnx-cal``: hfquant's default recipe calibrated on the same ``--calibration``
  windows as ``ort-gptq`` (``hfquant run ... --set calibration.num_samples=N``, checkpoint
  ``models/ckpt/gptq-w4-g128-calN``), in transformers and exported to ONNX: the like-for-like row.

Every ONNX row keeps the output head and embeddings float, as hfquant's checkpoint does, so the rows differ only in
how the decoder's Linears were rounded. PPL-16K: the first 32 windows of 512 tokens of WikiText-2 test, each from an
empty cache, through ``hfquant.eval.perplexity`` (the ONNX session behind a module that returns logits), so every
row is scored by the same code. Speed (``--speed``): decode = a 16-token prompt and 128 greedy tokens (batch 1;
onnxruntime-genai's generator for ONNX rows, ``generate`` for hfquant), tokens/s = 128 / wall time; prefill = one
1 x 512 forward; medians of ``--repeats`` runs after one untimed; ratios against the ``hfquant`` row of the same run.

Usage:
    python scripts/bench_onnx.py --out bench                      # accuracy of every row
    python scripts/bench_onnx.py --out bench --speed-only --update-benchmarks   # speed, on a quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.timing import run_meta, save_table  # noqa: E402

ROWS = ("hfquant", "hfquant-onnx", "hfquant-onnx-acc4", "ort-float", "ort-rtn", "ort-kquant", "hfquant-cal",
        "hfquant-onnx-cal", "ort-gptq",
        "hfquant-w8a8", "hfquant-onnx-w8a8")
FLOAT_NODES = "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"
BUILDER = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
RECIPE = "smollm2-135m-gptq-w4a16-g128.yaml"
HFQUANT_ROWS = ("hfquant", "hfquant-w8a8", "hfquant-cal")


class OrtLM(torch.nn.Module):
    """An ONNX decoder as a causal LM for ``hfquant.eval.perplexity``: each call is one window from an empty cache."""

    def __init__(self, folder: Path):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # perplexity reads the device

    def feeds(self, ids: np.ndarray) -> dict:
        c = self.config
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones(ids.shape, np.int64)}
        for inp in self.session.get_inputs():
            if inp.name.startswith("past_key_values"):
                feeds[inp.name] = np.zeros((ids.shape[0], c["num_key_value_heads"], 0, c["head_size"]), np.float32)
        return feeds

    def forward(self, input_ids):
        logits = self.session.run(["logits"], self.feeds(input_ids.numpy()))[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


def _build(args, out: Path, precision: str, *extra: str) -> Path:
    if not (out / "model.onnx").is_file():
        cmd = [*BUILDER, "-i", str(args.model), "-m", str(args.model), "-o", str(out), "-p", precision, "-e", "cpu",
               "-c", str(args.work / "cache"), "--extra_options", FLOAT_NODES, "hf_token=false", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            last = [ln for ln in done.stderr.splitlines() if ln.strip()][-1:]
            raise RuntimeError(f"the builder failed: {last[0] if last else done.returncode}")
    return out


def _hfquant_export(checkpoint: Path, out: Path, level: int) -> Path:
    if not (out / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "hfquant", "-q", "export", str(checkpoint), "--format", "onnx",
                        str(out), "--accuracy-level", str(level)], check=True)
    return out


def _ort_gptq(args, out: Path) -> Path:
    """ORT's GPTQ mode on the fp32 ONNX model (the head excluded: its GPTQ path ignores ``nodes_to_exclude``,
    so the head is marked float in the per-node config the quantizer builds)."""
    if (out / "model.onnx").is_file():
        return out
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from hfquant.calibration.data import calibration_windows
    import transformers

    src = _build(args, args.work / "ort-float", "fp32")
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(tok, num_samples=args.calibration, seq_len=512, seed=0).numpy()
    lm = OrtLM(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items, self.at = [lm.feeds(w[None]) for w in windows], 0

        def get_next(self):
            self.at += 1
            return self.items[self.at - 1] if self.at <= len(self.items) else None

    algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), percdamp=0.01, block_size=128)
    import onnx

    # a ModelProto with its weights loaded (from a path, the quantizer's GPTQ session sees no external data)
    quant = mnq.MatMulNBitsQuantizer(onnx.load(str(src / "model.onnx")), block_size=128, is_symmetric=True,
                                     accuracy_level=1, algo_config=algo)
    base = quant._generate_q4_node_config
    quant._generate_q4_node_config = lambda: {**base(), "/lm_head/MatMul": "fp32"}
    t0 = time.perf_counter()
    quant.process()
    out.mkdir(parents=True, exist_ok=True)
    quant.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    for p in src.iterdir():
        if p.suffix != ".onnx" and not p.name.startswith("model.onnx"):
            shutil.copy2(p, out / p.name)
    (out / "quantize_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return out


def folder_of(args, row: str) -> Path:
    w = args.work
    makers = {
        "hfquant-onnx": lambda: _hfquant_export(args.checkpoint, w / row, 1),
        "hfquant-onnx-acc4": lambda: _hfquant_export(args.checkpoint, w / row, 4),
        "hfquant-onnx-w8a8": lambda: _hfquant_export(args.w8a8_checkpoint, w / row, 1),
        "ort-float": lambda: _build(args, w / row, "fp32"),
        "ort-rtn": lambda: _build(args, w / row, "int4", "block_size=128", "is_symmetric=true", "accuracy_level=1"),
        "ort-kquant": lambda: _build(args, w / row, "int4", "block_size=128", "is_symmetric=true", "accuracy_level=1",
                                     "algo_config=k_quant"),
        "hfquant-onnx-cal": lambda: _hfquant_export(_cal_checkpoint(args), w / f"{row}{args.calibration}", 1),
        "ort-gptq": lambda: _ort_gptq(args, w / f"{row}-cal{args.calibration}"),
    }
    return makers[row]()


def _eval_ids(args):
    import transformers
    from hfquant.calibration.data import BUNDLED_EVALUATION, evaluation_token_ids

    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    return evaluation_token_ids(BUNDLED_EVALUATION.read_text(), tok, 512)


def _cal_checkpoint(args) -> Path:
    """hfquant's default recipe calibrated on ``--calibration`` windows (made once, kept in models/ckpt)."""
    out = ROOT / "models" / "ckpt" / f"gptq-w4-g128-cal{args.calibration}"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "hfquant", "-q", "run", str(ROOT / "recipes" / RECIPE), "--output",
                        str(out), "--overwrite", "--set", f"calibration.num_samples={args.calibration}",
                        "--set", "evaluation.before=false", "--set", "evaluation.after=false"], check=True)
    return out


def _checkpoint(args, row: str) -> Path:
    if row == "hfquant-cal":
        return _cal_checkpoint(args)
    return args.w8a8_checkpoint if row == "hfquant-w8a8" else args.checkpoint


def _hfquant_model(path: Path):
    import transformers
    import hfquant  # noqa: F401  (registers the quantizer)

    return transformers.AutoModelForCausalLM.from_pretrained(path)


def accuracy(args, row: str, ids) -> dict:
    from hfquant.eval.perplexity import perplexity

    t0 = time.perf_counter()
    if row in HFQUANT_ROWS:
        ckpt = _checkpoint(args, row)
        model, size = _hfquant_model(ckpt), sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    else:
        folder = folder_of(args, row)
        model, size = OrtLM(folder), sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    prepared = time.perf_counter() - t0
    ppl = perplexity(model, None, ids, seq_len=512, max_windows=args.windows)
    out = {"ppl": ppl, "file_mib": size / 2**20, "prepare_s": prepared}
    if row in ("ort-gptq", "hfquant-cal", "hfquant-onnx-cal"):
        out["calibration_windows"] = args.calibration
    return out


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(args, row: str) -> dict:
    prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    long = torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    if row in HFQUANT_ROWS:
        model = _hfquant_model(_checkpoint(args, row))
        with torch.no_grad():
            decode = _median(lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                    pad_token_id=0), args.repeats)
            prefill = _median(lambda: model(long), args.repeats)
    else:
        import onnxruntime_genai as og

        folder = folder_of(args, row)
        runtime, lm = og.Model(str(folder)), OrtLM(folder)

        def generate():
            params = og.GeneratorParams(runtime)
            params.set_search_options(do_sample=False, max_length=16 + n, min_length=16 + n)
            gen = og.Generator(runtime, params)
            gen.append_tokens(prompt[0].tolist())
            while not gen.is_done():
                gen.generate_next_token()

        decode = _median(generate, args.repeats)
        prefill = _median(lambda: lm(long), args.repeats)
    return {"decode_tok_s": n / decode, "prefill_tok_s": 512 / prefill}


def markdown(rows: dict, meta: dict) -> str:
    base = rows.get("hfquant", {})
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; {meta['threads']} threads; {meta['date']}", "",
             "| row | runtime | PPL-16K | weights file (MiB) | decode tok/s | vs hfquant (same scheme) | prefill tok/s (512) | vs hfquant |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | fails: {r['error']} | — | — | — | — | — | — |")
            continue
        runtime = ("transformers + hfquant kernels" if name in HFQUANT_ROWS else "onnxruntime (-genai for decode)")

        def cell(key, fmt="{:.1f}"):
            return fmt.format(r[key]) if key in r else "—"

        b = rows.get("hfquant-w8a8", {}) if "w8a8" in name else base  # each against hfquant's own of its scheme

        def ratio(key):
            return f"{r[key] / b[key]:.2f}x" if key in r and key in b else "—"

        if "calibration_windows" in r:
            runtime += f" (calibrated on {r['calibration_windows']} x 512 tokens)"
        lines.append(f"| {name} | {runtime} | {cell('ppl', '{:.3f}')} | {cell('file_mib')} | {cell('decode_tok_s')} | "
                     f"{ratio('decode_tok_s')} | {cell('prefill_tok_s')} | {ratio('prefill_tok_s')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "ckpt" / "gptq-w4-g128")
    p.add_argument("--w8a8-checkpoint", type=Path, default=ROOT / "models" / "ckpt" / "sq-w8a8")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "onnx")
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--calibration", type=int, default=8,
                   help="ort-gptq, hfquant-cal, hfquant-onnx-cal: calibration windows of 512 tokens")
    p.add_argument("--speed", action="store_true", help="also measure tokens/s (run on a quiet machine)")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--update-benchmarks", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "onnx.json"
    saved = json.loads(store.read_text()) if store.is_file() else {"rows": {}}
    ids = None if args.speed_only else _eval_ids(args)
    for row in args.rows:
        r = saved["rows"].setdefault(row, {})
        try:
            if not args.speed_only:
                r.update(accuracy(args, row, ids))
            if args.speed or args.speed_only:
                r.update(speed(args, row))
            r.pop("error", None)
        except (subprocess.CalledProcessError, RuntimeError, ValueError) as exc:  # a quantizer that fails is a result
            r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(row, json.dumps(r), flush=True)
        store.write_text(json.dumps(saved, indent=2))
    meta = run_meta("bench_onnx.py", argv)
    save_table(args.out, "onnx", meta, saved["rows"], markdown(saved["rows"], meta),
               "onnx" if args.update_benchmarks else None)


if __name__ == "__main__":
    main()
