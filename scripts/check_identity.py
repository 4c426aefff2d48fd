"""End-to-end identity check: run a fixed matrix of tiny quantization runs with whichever ``hfquant`` is importable
and write the sha256 of every output file, so two versions of the package (e.g. before and after a refactor) can be
compared file for file.

    python scripts/check_identity.py --out DIR            # runs the matrix, writes DIR/manifest.json (+ DIR/runs/)
    python scripts/check_identity.py --compare A B        # A, B: manifests or their DIRs; exit 1 if any differ

``PYTHONPATH=/path/to/other/checkout python scripts/check_identity.py --out DIR`` checks another copy of the package:
every run is a child process (``python -m hfquant ...``, ``accelerate launch ... -m hfquant``, or a short Python
snippet) started from a folder inside DIR with ``PYTHONPATH`` starting with the parent of the ``hfquant`` this script
imported, so the children run the same copy (never the current directory's).

Everything is offline and deterministic: the tiny models are built here from a config and a seed, the tokenizer is a
byte-level BPE trained on the package's bundled WikiText-2 validation text (deterministic), calibration is the bundled
text (8 windows x 64 tokens), evaluation 4 windows x 64 tokens of the bundled test text. Every child runs with one
intra-op thread (``OMP_NUM_THREADS=1``: GEMMs give the same bits in every case, and two calibration processes x 1
thread equal one process x 1 thread, as the package promises) and with the CPU kernel paths forced by name (the
default ``reproducible`` mode times the candidates once per machine, which could pick another path in another run):
``--kernels forced`` (default: ``HFQUANT_CPU_PREFILL=int16``, ``HFQUANT_CPU_W8A8=int``, ``HFQUANT_CPU_HALF=gemv``) or
``--kernels reference`` (``HFQUANT_KERNEL=reference``).

What is normalised (only what is volatile): in every text file the run's root folder (``<OUT>``); in ``report.json``
and ``sensitivity.json`` every ``timings`` value, every ``seconds`` / ``*_seconds`` value, the ``versions`` values,
the ``kernel_build`` timing (present only when the CPU kernels were compiled in that run), and the ``torch`` version
and ``machine`` of the quantization report; in the model card ``README.md`` the quantization-seconds cell, the
kernel-build line and the hfquant version. Binary files (safetensors, gguf, png) are hashed as written.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 320
PY = sys.executable


# ----------------------------------------------------------------------------------------- tiny models and tokenizer
def bundled_text(name: str = "valid.txt") -> Path:
    """The package's bundled WikiText-2 file ``name`` (found under the imported package, wherever it lives)."""
    import hfquant

    root = Path(hfquant.__file__).resolve().parent
    found = sorted(p for p in root.rglob(name) if p.parent.name == "wikitext2")
    if not found:
        raise SystemExit(f"check_identity: no wikitext2/{name} under {root}")
    return found[0]


def tiny_tokenizer():
    """A byte-level BPE of ``VOCAB`` tokens trained on the first 60000 characters of the bundled calibration text
    (the same recipe as tests/helpers.py; training is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([bundled_text().read_text()[:60000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


MODELS = {
    # name: (family, config fields)
    "llama-h128": ("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-h128-l3": ("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-h256": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=True)),  # rows of 256: K-quants
    "qwen2-h128": ("qwen2", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False)),
}


def tiny_config(family: str, **fields):
    import transformers as tf

    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family]
    return cls(vocab_size=VOCAB, max_position_embeddings=256, **fields)


def save_tiny_model(folder: Path, family: str, seed: int = 0, tokenizer=None, **fields) -> Path:
    """A randomly initialised (seeded) float32 causal LM saved with ``save_pretrained`` (and the tokenizer)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, **fields))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- normalisation
VOLATILE_KEYS = {"timings", "versions"}
_SECONDS = re.compile(r"(^|_)seconds$")


def _normalise_json(value, parent: str = ""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in VOLATILE_KEYS and isinstance(v, dict):
                out[k] = {kk: "<normalised>" for kk in sorted(v) if kk != "kernel_build"}
            elif _SECONDS.search(k) and k != "kernel_build_seconds":
                out[k] = "<normalised>" if not isinstance(v, dict) else {kk: "<normalised>" for kk in v}
            elif k == "kernel_build_seconds":
                continue  # only present when the kernels were compiled during that run
            elif parent == "quantization" and k in ("torch", "machine"):
                out[k] = "<normalised>"
            else:
                out[k] = _normalise_json(v, k)
        return out
    if isinstance(value, list):
        return [_normalise_json(v, parent) for v in value]
    return value


def _normalise_card(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("hfquant's CPU kernels were built in this run"):
            if lines and not lines[-1].strip():
                lines.pop()  # the blank line the note adds under the table
            continue
        if line.startswith("| ") and line.rstrip().endswith(" |") and "quantization (s)" not in line:
            cells = line.rstrip().split(" | ")
            if len(cells) >= 4 and re.fullmatch(r"[\d.]+ \|", cells[-1]):  # the quantized row's seconds
                line = " | ".join(cells[:-1] + ["<s> |"])
        lines.append(line)
    text = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
    return re.sub(r"quantized with hfquant [^\s:]+:", "quantized with hfquant <version>:", text)


TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".txt", ".jinja")


def normalised_bytes(path: Path, roots: list[str]) -> bytes:
    data = path.read_bytes()
    if path.suffix not in TEXT_SUFFIXES:
        return data
    text = data.decode("utf-8")
    for root in roots:
        text = text.replace(root, "<OUT>")
    if path.name in ("report.json", "sensitivity.json"):
        text = json.dumps(_normalise_json(json.loads(text)), indent=1, sort_keys=False) + "\n"
    elif path.name == "README.md":
        text = _normalise_card(text)
    return text.encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------ the runs
class Matrix:
    def __init__(self, out: Path, kernels: str, jobs: int):
        import hfquant

        self.out = out
        self.runs = out / "runs"
        self.models = out / "models"
        self.jobs = jobs
        self.package = Path(hfquant.__file__).resolve().parent
        self.roots = sorted({str(out), str(out.resolve())}, key=len, reverse=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HFQUANT_", "OMP_", "MKL_"))}
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
                   HF_DATASETS_CACHE=str(out / "cache" / "datasets"),
                   HFQUANT_CPU_CHOICES=str(out / "cache" / "cpu-paths.json"),
                   PYTHONPATH=os.pathsep.join([str(self.package.parent), *inherited]))
        if kernels == "reference":
            env["HFQUANT_KERNEL"] = "reference"
        else:
            env.update(HFQUANT_CPU_PREFILL="int16", HFQUANT_CPU_W8A8="int", HFQUANT_CPU_HALF="gemv")
        self.env = env
        self.cwd = out / "cwd"  # never the repository: `python -m hfquant` would import the current directory's copy
        self.log = out / "logs"
        self.results: dict[str, dict] = {}

    # -- helpers
    def sh(self, name: str, argv: list[str], env: dict | None = None, check: bool = True, timeout: int = 600):
        """Run ``argv``; returns (returncode, stdout, stderr); logs into logs/<name>.log."""
        t0 = time.perf_counter()
        proc = subprocess.run([str(a) for a in argv], cwd=self.cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        with open(self.log / f"{name}.log", "a") as f:
            f.write(f"$ {' '.join(map(str, argv))}\n[{proc.returncode}, {time.perf_counter() - t0:.1f} s]\n"
                    f"{proc.stdout}\n{proc.stderr}\n")
        if "kernels extension could not be built" in proc.stderr:  # the machine, not the package: say so
            raise RuntimeError(f"{name}: hfquant's CPU kernels could not be built in this environment (see "
                               f"logs/{name}.log); the evaluation would run another kernel path")
        if check and proc.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(map(str, argv[:6]))} ... exited {proc.returncode}: "
                               f"{proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ''}")
        return proc.returncode, proc.stdout, proc.stderr

    def recipe(self, case: str, model: str, output: Path, quantization: dict, calibration: dict | None = None,
               evaluation: dict | None = None) -> Path:
        import yaml

        recipe = {
            "model": str(self.models / model),
            "output_dir": str(output),
            "quantization": quantization,
            "calibration": {"num_samples": 8, "seq_len": 64, "batch_size": 4, **(calibration or {})},
            "evaluation": {"seq_len": 64, "max_tokens": 256, **(evaluation or {})},
        }
        path = self.runs / case / f"{output.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    def hfquant(self, case: str, *args, **kw):
        return self.sh(case, [PY, "-m", "hfquant", "-q", *args], **kw)

    def export(self, case: str, src: Path, fmt: str, outcomes: dict, *extra) -> None:
        """``hfquant export src --format fmt``; a refusal (exit 2) is recorded as an outcome, not an error."""
        dst = src.parent / f"export-{fmt}{'-' + '-'.join(extra).strip('-') if extra else ''}"
        code, _, err = self.hfquant(case, "export", src, "--format", fmt, dst, *extra, check=False)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        outcomes[f"export {src.name} --format {fmt} {' '.join(extra)}".strip()] = (
            "ok" if code == 0 else f"exit {code}: {self._normalise_line(last)}")

    def _normalise_line(self, line: str) -> str:
        for root in self.roots:
            line = line.replace(root, "<OUT>")
        return line

    def eval_line(self, case: str, folder: Path, outcomes: dict) -> None:
        """``hfquant eval`` of a saved checkpoint (reload path): its perplexity line."""
        code, out, err = self.hfquant(case, "eval", folder, "--seq-len", "64", "--max-tokens", "256", check=False)
        if code == 0:
            line = next(l for l in out.splitlines() if l.startswith("perplexity"))
        else:  # e.g. a GPTQ-layout folder: transformers' own GPTQ loader needs optimum; recorded as it is
            line = f"exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}"
        outcomes[f"eval {folder.name}"] = self._normalise_line(line)

    # -- the matrix
    def build_models(self) -> None:
        tok = tiny_tokenizer()
        for name, (family, fields) in MODELS.items():
            save_tiny_model(self.models / name, family, seed=0, tokenizer=tok, **fields)

    def cases(self) -> dict:
        g128 = {"method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}
        g32 = {"method": "gptq", "bits": 4, "group_size": 32}
        overrides = {"re:.*down_proj": {"bits": 8}, "*.layers.0.*": {"bits": 3, "group_size": 64},
                     "model.layers.1.self_attn.q_proj": {"bits": 2, "group_size": 32, "sym": False},
                     "model.layers.0.mlp.down_proj": {"skip": True}, "*.v_proj": {"method": "rtn"}}
        return {
            # name: (function, kwargs); each writes under runs/<name>/ and returns its outcomes
            "gptq_w4g128_actorder_sym": (self.run_case, dict(model="llama-h128", q={**g128, "sym": True},
                                                             exports=["gptq", "compressed-tensors"], evaluate=True)),
            "gptq_w4g128_actorder_asym": (self.run_case, dict(model="llama-h128", q={**g128, "sym": False},
                                                              exports=["gptq", "compressed-tensors"],
                                                              extra_exports=[("gptq", "--checkpoint-format",
                                                                              "gptq_v2")])),
            "gptq_quality_best": (self.run_case, dict(model="llama-h128", q={**g32, "quality": "best",
                                                                            "reconstruct_steps": 3})),
            "rtn_w4g32_asym": (self.run_case, dict(model="llama-h128", q={"method": "rtn", "bits": 4, "group_size": 32,
                                                                         "sym": False},
                                                   exports=["gptq", "compressed-tensors"])),
            "gptq_mixed_overrides": (self.run_case, dict(model="llama-h128", q={**g32, "overrides": overrides},
                                                         exports=["gptq", "compressed-tensors"], evaluate=True)),
            "gptq_bits_auto": (self.run_case, dict(model="llama-h128", q={"method": "gptq", "bits": "auto",
                                                                          "target_avg_bits": 4.5, "fisher_windows": 4},
                                                   exports=["compressed-tensors"])),
            "gptq_lm_head8": (self.run_case, dict(model="llama-h128", q={**g32, "lm_head_bits": 8},
                                                  exports=["gptq"], evaluate=True)),
            "qwen2_rtn_lm_head8": (self.run_case, dict(model="qwen2-h128", q={"method": "rtn", "bits": 4,
                                                                              "group_size": 32, "lm_head_bits": 8})),
            "gguf_q4km_hfquant": (self.run_case, dict(model="llama-h256", q={"method": "gptq", "gguf_type": "Q4_K_M"},
                                                      exports=["gguf"], evaluate=True)),
            "gguf_q4km_save_gguf": (self.run_case, dict(model="llama-h256", q={"method": "gptq", "gguf_type": "Q4_K_M",
                                                                               "save_format": "gguf"}, evaluate=True)),
            "sq_w8a8_static": (self.run_case, dict(model="llama-h128", q={"method": "smoothquant",
                                                                          "activation_scheme": "static",
                                                                          "weight_method": "gptq"},
                                                   exports=["compressed-tensors", "gptq"], evaluate=True)),
            "sq_w8a8_dynamic": (self.run_case, dict(model="llama-h128", q={"method": "smoothquant", "alpha": 0.5},
                                                    exports=["compressed-tensors"])),
            "gptq_w4g32": (self.run_case, dict(model="llama-h128", q=g32)),
            "save_format_gptq": (self.run_case, dict(model="llama-h128", q={**g32, "save_format": "gptq"},
                                                     evaluate=True)),
            "save_format_compressed_tensors": (self.run_case, dict(model="llama-h128",
                                                                   q={**g32, "save_format": "compressed-tensors"})),
            "sq_save_format_compressed_tensors": (self.sq_python_case, {}),
            "resume": (self.resume_case, {}),
            "layerwise_disk": (self.layerwise_case, {}),
            "two_processes": (self.two_processes_case, {}),
        }

    def run_case(self, case: str, model: str, q: dict, exports=(), extra_exports=(), evaluate=False,
                 calibration=None, evaluation=None) -> dict:
        out = self.runs / case / "out"
        recipe = self.recipe(case, model, out, q, calibration, evaluation)
        self.hfquant(case, "run", recipe)
        outcomes: dict = {}
        for fmt in exports:
            self.export(case, out, fmt, outcomes)
        for fmt, *extra in extra_exports:
            self.export(case, out, fmt, outcomes, *extra)
        if evaluate:
            self.eval_line(case, out, outcomes)
        return outcomes

    def sq_python_case(self, case: str) -> dict:
        """SmoothQuant saved as compressed-tensors from Python (the recipe schema has no save_format for it)."""
        out = self.runs / case / "out"
        code = f"""
import torch, hfquant
from transformers import AutoModelForCausalLM
cfg = hfquant.HFQuantConfig(method="smoothquant", save_format="compressed-tensors", num_samples=8, seq_len=64,
                            calibration_batch_size=4)
model = AutoModelForCausalLM.from_pretrained({str(self.models / 'llama-h128')!r}, dtype=torch.float32,
                                             quantization_config=cfg)
model.save_pretrained({str(out)!r})
"""
        self.sh(case, [PY, "-c", code])
        return {}

    def resume_case(self, case: str) -> dict:
        """A straight run, and a run stopped with SIGKILL after block 1 is saved (as tests/quantize/test_resume.py does)
        then ``--resume``d: the checkpoint files must be equal."""
        folder = self.runs / case
        q = {"method": "gptq", "bits": 4, "group_size": 32}
        ev = {"before": False, "after": False}
        straight = folder / "straight"
        self.hfquant(case, "run", self.recipe(case, "llama-h128-l3", straight, q, evaluation=ev))
        out = folder / "resumed"
        recipe = self.recipe(case, "llama-h128-l3", out, q, evaluation=ev)
        progress = out.parent / f".{out.name}.hfquant-progress"
        victim = subprocess.Popen([PY, "-m", "hfquant", "-q", "run", str(recipe)], cwd=self.cwd,
                                  env={**self.env, "HFQUANT_TEST_PAUSE_AFTER_BLOCK": "1"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, state = time.time() + 300, {}
        while time.time() < deadline and victim.poll() is None:
            try:
                state = json.loads((progress / "state.json").read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("blocks_done") == 2:
                break
            time.sleep(0.2)
        if state.get("blocks_done") != 2:
            victim.kill()
            raise RuntimeError(f"{case}: the run did not pause after block 1 (exit {victim.poll()})")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        killed_files = sorted(p.name for p in progress.iterdir())
        self.hfquant(case, "run", recipe, "--resume")
        report = json.loads((out / "report.json").read_text())
        same = {name: (straight / name).read_bytes() == (out / name).read_bytes()
                for name in ("model.safetensors", "config.json")}
        layers_same = report["layers"] == json.loads((straight / "report.json").read_text())["layers"]
        if not all(same.values()) or not layers_same:
            raise RuntimeError(f"{case}: the resumed checkpoint differs from the straight run: {same}, layers "
                               f"{layers_same}")
        return {"progress files when killed": killed_files, "resumed_from_block": report["resumed_from_block"],
                "resumed == straight (model.safetensors, config.json, report layers)": True}

    def layerwise_case(self, case: str) -> dict:
        """Layer-wise onloading with activations on disk; the checkpoint equals a full-load run's."""
        folder = self.runs / case
        q = {"method": "gptq", "bits": 4, "group_size": 32}
        full = folder / "full"
        self.hfquant(case, "run", self.recipe(case, "qwen2-h128", full, q))
        lw = folder / "layerwise"
        self.hfquant(case, "run", self.recipe(case, "qwen2-h128", lw, q,
                                              calibration={"layerwise": True, "activations": "disk",
                                                           "offload_folder": str(folder / "activations")}))
        if (full / "model.safetensors").read_bytes() != (lw / "model.safetensors").read_bytes():
            raise RuntimeError(f"{case}: the layer-wise checkpoint differs from the full-load one")
        left = sorted(p.name for p in (folder / "activations").iterdir()) if (folder / "activations").exists() else []
        return {"layerwise == full (model.safetensors)": True, "activation folder left": left}

    def two_processes_case(self, case: str) -> dict:
        """``accelerate launch --multi_gpu --num_processes 2 -m hfquant run`` on CPU (gloo, 1 thread each), as
        tests/calibration/test_scale.py does: its checkpoint equals the one-process run (1 thread)."""
        folder = self.runs / case
        q = {"method": "gptq", "bits": 4, "group_size": 32, "quality": "best", "reconstruct_steps": 2}
        ev = {"before": False, "after": True}
        one = folder / "one"
        self.hfquant(case, "run", self.recipe(case, "llama-h128", one, q, evaluation=ev))
        two = folder / "two"
        recipe = self.recipe(case, "llama-h128", two, q, evaluation=ev)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        launcher = Path(PY).parent / "accelerate"
        self.sh(case, [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1",
                       "--main_process_port", port, "-m", "hfquant", "-q", "run", recipe],
                env={"MASTER_PORT": port})
        if (one / "model.safetensors").read_bytes() != (two / "model.safetensors").read_bytes():
            raise RuntimeError(f"{case}: two processes gave another checkpoint than one")
        processes = json.loads((two / "report.json").read_text())["quantization"]["calibration"].get("processes")
        return {"two processes == one (model.safetensors)": True, "report processes": processes}

    # -- driver
    def run(self, only: list[str] | None = None) -> dict:
        for d in (self.runs, self.models, self.cwd, self.log):
            d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.build_models()
        cases = self.cases()
        if only:
            unknown = sorted(set(only) - set(cases))
            if unknown:
                raise SystemExit(f"check_identity: unknown cases {unknown}; known: {sorted(cases)}")
            cases = {k: v for k, v in cases.items() if k in only}
        # the slowest first, so the pool finishes together
        first = ["two_processes", "resume", "gptq_bits_auto", "layerwise_disk", "gguf_q4km_hfquant",
                 "gguf_q4km_save_gguf"]
        order = [c for c in first if c in cases] + [c for c in cases if c not in first]
        results, errors, seconds = {}, {}, {}

        def one(name):
            fn, kw = cases[name]
            t = time.perf_counter()
            try:
                return name, fn(name, **kw), None, time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - recorded, the matrix goes on
                return name, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t

        with cf.ThreadPoolExecutor(self.jobs) as pool:
            for name, outcome, error, secs in pool.map(one, order):
                seconds[name] = round(secs, 1)
                if error:
                    errors[name] = self._normalise_line(error)
                    print(f"  {name}: FAILED {error} ({secs:.0f} s)", flush=True)
                else:
                    results[name] = outcome
                    print(f"  {name}: ok ({secs:.0f} s)", flush=True)
        manifest_cases = {}
        for name in cases:
            files = {}
            folder = self.runs / name
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = path.relative_to(folder).as_posix()
                if path.suffix == ".yaml" and path.parent == folder:
                    continue  # the recipe this script wrote
                if "hfquant-progress" in rel or "hfquant-partial" in rel or "hfquant-lock" in rel:
                    continue
                files[rel] = sha256(normalised_bytes(path, self.roots))
            manifest_cases[name] = {"files": files, "outcomes": results.get(name), "error": errors.get(name)}
        import hfquant
        import torch
        import transformers

        return {
            "cases": manifest_cases,
            "info": {"hfquant": str(self.package), "hfquant_version": hfquant.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "kernels": "reference" if "HFQUANT_KERNEL" in self.env
                     else "forced", "runtime_s": round(time.perf_counter() - t0, 1), "case_seconds": seconds,
                     "jobs": self.jobs},
        }


# ------------------------------------------------------------------------------------------------------ compare
def _manifest(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    return json.loads(p.read_text())


def compare(a: str, b: str) -> int:
    ma, mb = _manifest(a), _manifest(b)
    ca, cb = ma["cases"], mb["cases"]
    problems = []
    for case in sorted(set(ca) | set(cb)):
        if case not in ca or case not in cb:
            problems.append(f"{case}: only in {'B' if case not in ca else 'A'}")
            continue
        fa, fb = ca[case]["files"], cb[case]["files"]
        for name in sorted(set(fa) | set(fb)):
            if fa.get(name) != fb.get(name):
                what = "only in B" if name not in fa else "only in A" if name not in fb else "differs"
                problems.append(f"{case}/{name}: {what}")
        for key in ("outcomes", "error"):
            if ca[case].get(key) != cb[case].get(key):
                problems.append(f"{case}: {key} differ: A={ca[case].get(key)!r} B={cb[case].get(key)!r}")
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} differences between {a} and {b}")
        return 1
    n = sum(len(c["files"]) for c in ca.values())
    print(f"identical: {len(ca)} cases, {n} files")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="folder to write (must not exist or be empty)")
    mode.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two manifests (or folders holding them)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each child uses one thread)")
    parser.add_argument("--kernels", choices=["forced", "reference"], default="forced")
    parser.add_argument("--only", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} exists and is not empty")
    import hfquant

    print(f"check_identity: hfquant from {Path(hfquant.__file__).resolve().parent}", flush=True)
    matrix = Matrix(out, args.kernels, args.jobs)
    manifest = matrix.run(args.only.split(",") if args.only else None)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    failed = [c for c, v in manifest["cases"].items() if v["error"]]
    print(f"wrote {out / 'manifest.json'}: {len(manifest['cases'])} cases, "
          f"{sum(len(v['files']) for v in manifest['cases'].values())} files, {manifest['info']['runtime_s']} s"
          + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
