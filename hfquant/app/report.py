"""The output folder: checks before a run, atomic placement, ``report.json``, the model card, reading it back.

A finished folder holds the checkpoint (``config.json`` + ``*.safetensors``), the tokenizer,
``hfquant_recipe.yaml`` (the resolved recipe), ``report.json`` and ``README.md`` (a model card). It is
assembled in ``.<name>.hfquant-partial`` next to the output folder and renamed into place only when
complete, so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub import ModelCard, ModelCardData
import safetensors
import torch
import transformers

from hfquant import __version__
from hfquant.app.recipe import looks_local
from hfquant.formats.files import tensor_headers
from hfquant.formats.gguf import read_gguf_header
from hfquant.core.schemes import summary
from hfquant.mixed.sensitivity import has_fisher, plot, to_markdown

REPORT = "report.json"
RECIPE = "hfquant_recipe.yaml"
CARD = "README.md"


def versions() -> dict:
    return {"hfquant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def _ppl(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def table(report: dict) -> str:
    """The before/after table (Markdown) of a report."""
    ev = report.get("evaluation") or {}
    if ev.get("windows") and ev.get("dataset"):
        label = f"PPL ({ev['dataset']}, {ev['windows']} x {ev.get('seq_len', '?')} tokens)"
    else:
        label = "PPL (not evaluated)"
    q = report["quantization"]
    timing = report.get("timings", {})
    desc = describe(report["config"])
    rows = [f"| model | {label} | checkpoint (MiB) | quantization (s) |", "|---|---|---|---|",
            (f"| {report['model_name']} ({report.get('dtype', 'float32')}) | {_ppl(ev.get('before'))} | "
             f"{report.get('source_mib', '—')} | — |"),
            (f"| {desc} | {_ppl(ev.get('after'))} | {report['checkpoint_bytes'] / 2**20:.1f} | "
             f"{timing.get('quantize', q.get('quantization_seconds', 0)):.1f} |")]
    note = kernel_build_note(timing.get("kernel_build", q.get("kernel_build_seconds", 0.0)))
    tasks = task_table(report.get("tasks"))
    return "\n".join(rows + (["", note] if note else []) + (["", tasks] if tasks else []))


def task_section(before: dict | None, after: dict | None) -> dict | None:
    """``report.json``'s ``tasks`` from ``hfquant.eval.tasks.evaluate_tasks``' results of the float (``before``) and
    quantized (``after``) models: lm-eval's version, the item limit and few-shot setting, and each model's rows
    (``None`` for a model not evaluated); ``None`` when neither was."""
    first = before or after
    if not first:
        return None
    return {"lm_eval": first["lm_eval"], "limit": first["limit"], "num_fewshot": first["num_fewshot"],
            "before": before["tasks"] if before else None, "after": after["tasks"] if after else None}


_ROW_KEYS = ("n", "num_fewshot", "version")


def _score(row: dict | None, metric: str) -> str:
    if not row or row.get(metric) is None:
        return "—"
    err = row.get(f"{metric}_stderr")
    return f"{row[metric]:.4f}" + (f" ± {err:.4f}" if err is not None else "")


def task_table(tasks: dict | None, labels: tuple[str, str] = ("float (before)", "quantized (after)")) -> str:
    """The lm-eval table (Markdown) of a report's ``tasks`` section: one row per task and metric, the float and the
    quantized model's score ± standard error side by side (a column only for a model that was evaluated); ``""``
    without tasks."""
    if not tasks:
        return ""
    sides = [(label, tasks.get(key) or {}) for label, key in zip(labels, ("before", "after")) if tasks.get(key)]
    if not sides:
        return ""
    rows = ["| task | metric | items | shots | " + " | ".join(label for label, _ in sides) + " |",
            "|---|---|---|---|" + "---|" * len(sides)]
    for name in dict.fromkeys(n for _, side in sides for n in side):
        ref = next(side[name] for _, side in reversed(sides) if name in side)
        for metric in (k for k in ref if k not in _ROW_KEYS and not k.endswith("_stderr")):
            scores = " | ".join(_score(side.get(name), metric) for _, side in sides)
            rows.append(f"| {name} | {metric} | {ref.get('n', '—')} | {ref.get('num_fewshot', '—')} | {scores} |")
    limit = f"; the first {tasks['limit']} items of each task" if tasks.get("limit") else ""
    return "\n".join(rows + ["", f"Task accuracy: lm-eval {tasks.get('lm_eval', '?')}, run in-process on the model "
                                  f"itself{limit}; ± is lm-eval's standard error."])


KERNEL_BUILD_SHOWN = 1.0  # seconds: loading a finished build takes ~0.02 s, building hfquant's CPU kernels ~40 s


def kernel_build_note(seconds: float, step: str = "quantization") -> str:
    """The line that says hfquant's CPU kernels were built (or another process's build waited for) during the run,
    and that those seconds are not in ``step``'s time; ``""`` below ``KERNEL_BUILD_SHOWN``."""
    if seconds < KERNEL_BUILD_SHOWN:
        return ""
    return f"hfquant's CPU kernels were built in this run: {seconds:.1f} s (not counted in {step})"


def describe(config: dict) -> str:
    m = config["method"]
    if m == "smoothquant":
        return f"hfquant SmoothQuant W8A8 (alpha={config['alpha']}, weights {config['weight_method']}, {config['activation_scheme']} activations)"
    sym = "sym" if config["sym"] else "asym"
    if config.get("bits") == "auto":
        goal = (f"{config['target_avg_bits']} avg bits" if config.get("target_avg_bits") is not None
                else f"max PPL +{config['max_ppl_increase']:.1%}")
        return f"hfquant {m.upper()} mixed precision (bits auto, {goal}) {sym}"
    group = "per-channel" if config["group_size"] == -1 else f"g{config['group_size']}"
    mixed = " with per-module overrides" if config.get("overrides") else ""
    head = f", lm_head {config['lm_head_bits']}-bit per-channel" if config.get("lm_head_bits") else ""
    return f"hfquant {m.upper()} W{config['bits']}A16 {group} {sym}{mixed}{head}"


def write_card(folder: Path, report: dict, recipe: dict, name: str) -> None:
    """``README.md`` made with ``huggingface_hub.ModelCard``: metadata, how to load, the measured table
    (and the mixed-precision allocation and sensitivity plot, when there are)."""
    model = recipe["model"]
    data = ModelCardData(library_name="transformers", tags=["hfquant", report["config"]["method"], "quantized"],
                         base_model=None if looks_local(model) else model, pipeline_tag="text-generation")
    repo = recipe["hub"]["repo_id"] or "path/to/this/folder"
    cal = report["quantization"].get("calibration", {})
    body = f"""
# {name}

`{report['model_name']}` quantized with hfquant {report['versions']['hfquant']}: {describe(report['config']).removeprefix('hfquant ')}.

## How to load

{_how_to_load(report, repo)}

## Measured

{table(report)}

Calibration: {cal.get('shape', ['—', '—'])[0]} windows x {cal.get('shape', ['—', '—'])[-1]} tokens, data hash
`{cal.get('fingerprint', '—')}`. Every number above was measured by this run; the per-layer errors,
timings and package versions are in `report.json`, the exact recipe in `hfquant_recipe.yaml`
(`hfquant run hfquant_recipe.yaml` reproduces it).

{card_section(report, folder)}"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(str(folder / CARD))


def _how_to_load(report: dict, repo: str) -> str:
    """The model card's loading snippet: hfquant's layout (``import hfquant`` first), or the GGUF file."""
    if report["config"].get("save_format") == "gguf":
        return f"""`model.gguf` runs in llama.cpp, Ollama and LM Studio; transformers reads it too (de-quantized):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", gguf_file="model.gguf")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```
"""
    return f"""```python
import hfquant  # registers quant_method "hfquant" with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

Without `import hfquant`, loading fails loudly (size mismatch) instead of returning a broken model.
"""


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT).write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")


# --- sensitivity tables (``hfquant sensitivity``, ``bits: auto``) and their model-card section

SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_MD = "sensitivity.md"
SENSITIVITY_PNG = "sensitivity.png"


def write_sensitivity(folder: Path, table: dict, allocation: dict | None = None) -> None:
    (folder / SENSITIVITY_JSON).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    (folder / SENSITIVITY_MD).write_text(to_markdown(table, allocation), encoding="utf-8")
    plot(table, folder / SENSITIVITY_PNG, allocation)


def stored_average_bits(folder: Path) -> dict:
    """Measured from the saved safetensors: bits of ``weight`` + ``scales`` + ``zeros`` + ``g_idx`` of every
    W4A16 module, over its ``in * out`` weights (an MoE's stacked experts: ``experts * in * out``); for a GGUF
    folder (no safetensors), the bytes of the decoder layers' block-type weights over their values. Returns ``{"avg_bits", "modules", "weights"}``."""
    ggufs = sorted(Path(folder).glob("*.gguf"))
    if ggufs and not any(Path(folder).glob("*.safetensors")):
        linears = read_gguf_header(ggufs[0])["linears"]
        return {"avg_bits": linears["stored_bits"], "modules": linears["tensors"], "weights": linears["elements"]}
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    sizes: dict[str, dict] = {}  # module -> leaf -> (shape, bytes); read from the headers, no tensor data
    for key, shape, dtype in tensor_headers(sorted(Path(folder).glob("*.safetensors"))):
        name, _, leaf = key.rpartition(".")
        if leaf in ("weight", "scales", "zeros", "g_idx"):
            sizes.setdefault(name, {})[leaf] = (shape, math.prod(shape) * itemsize[dtype])
    bits = weights = 0
    count = 0
    for parts in sizes.values():
        if set(parts) != {"weight", "scales", "zeros", "g_idx"}:
            continue  # a float Linear (no scales/zeros/g_idx)
        count += 1
        bits += sum(nbytes * 8 for _, nbytes in parts.values())
        g_idx, scales = parts["g_idx"][0], parts["scales"][0]  # [in], [out, G]; stacked experts: [E, in], [E, out, G]
        weights += g_idx[-1] * scales[-2] * (scales[0] if len(scales) == 3 else 1)
    return {"avg_bits": bits / weights if weights else None, "modules": count, "weights": weights}


def card_section(report: dict, folder: Path) -> str:
    """Markdown for the model card: the allocation and the sensitivity plot (when present)."""
    auto = report.get("auto") or {}
    allocation = auto.get("allocation")
    lines = []
    schemes = report["config"].get("module_schemes")
    if schemes or allocation or (folder / SENSITIVITY_PNG).exists():
        lines += ["## Mixed precision", ""]
    if schemes:
        lines.append(f"Per-module schemes ({len(schemes)} modules): {summary(schemes)}; the exact scheme of every "
                     "module is `quantization_config.module_schemes` in `config.json`.")
        lines.append("")
    if auto:
        goal = (f"target {auto['target_avg_bits']} average bits" if auto.get("target_avg_bits") is not None
                else f"perplexity increase at most {auto['max_ppl_increase']:.1%} on WikiText-2 valid windows")
        measured = report.get("stored_bits", {}).get("avg_bits")
        lines.append(f"`bits: auto`, {goal}: allocation predicted {auto['predicted_avg_bits']:.4f} stored bits per weight"
                     + (f", measured {measured:.4f} from the saved tensors" if measured else "")
                     + " (codes, scales, zeros and g_idx over the quantized modules).")
        lines.append("")
    conflicts = report.get("quantization", {}).get("override_conflicts") or []
    if conflicts:
        lines.append(f"{len(conflicts)} override conflicts were resolved by the most specific pattern (see `report.json`).")
        lines.append("")
    if (folder / SENSITIVITY_PNG).exists():
        lines += [f"![per-module sensitivity]({SENSITIVITY_PNG})", "",
                  f"Per-module sensitivity: {measure_words(json.loads((folder / SENSITIVITY_JSON).read_text()))} "
                  "when only that module is quantized at each candidate "
                  f"(table: `{SENSITIVITY_MD}`, data: `{SENSITIVITY_JSON}`)" + ("; circles mark the chosen scheme." if allocation else "."),
                  ""]
    return "\n".join(lines)


def measure_words(table: dict) -> str:
    """What the sensitivity plot of ``table`` shows (the quantity the allocation minimises)."""
    return ("the estimated increase of the next-token loss" if has_fisher(table)
            else "the relative output error")

