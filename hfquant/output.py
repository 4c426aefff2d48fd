"""The output folder: checks before a run, atomic placement, ``report.json``, the model card, reading it back.

A finished folder holds the checkpoint (``config.json`` + ``*.safetensors``), the tokenizer,
``hfquant_recipe.yaml`` (the resolved recipe), ``report.json`` and ``README.md`` (a model card). It is
assembled in ``.<name>.hfquant-partial`` next to the output folder and renamed into place only when
complete, so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

from hfquant.errors import ConfigError

REPORT = "report.json"
RECIPE = "hfquant_recipe.yaml"
CARD = "README.md"


class CheckpointError(ConfigError):
    """A folder given to ``eval``/``inspect``/``push`` is not a readable hfquant checkpoint."""


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.hfquant-partial"


def progress_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.hfquant-progress"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Raise ``ConfigError`` unless ``out`` can be created (or replaced, with ``overwrite``). Writes nothing."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"output_dir: {str(out)!r} is a file, not a folder; choose another --output")
        try:
            non_empty = any(out.iterdir())
        except OSError as exc:
            raise ConfigError(f"output_dir: cannot read {str(out)!r} ({exc.strerror}); choose another --output") from None
        if non_empty and not overwrite:
            raise ConfigError(f"output_dir: {str(out)!r} exists and is not empty; pass --overwrite to replace it "
                              "or choose another --output")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output_dir: cannot create {str(out)!r}: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: cannot create {str(out)!r}: {str(parent)!r} is not writable; choose another --output")


def place(partial: Path, out: Path) -> None:
    """Move the finished ``partial`` folder to ``out``, replacing what is there (checked before the run)."""
    old = out.parent / f".{out.name}.hfquant-old"
    if old.exists():
        shutil.rmtree(old)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        os.rename(out, old)
    os.rename(partial, out)
    if old.exists():
        shutil.rmtree(old)


def versions() -> dict:
    import huggingface_hub
    import safetensors
    import torch
    import transformers

    import hfquant

    return {"hfquant": hfquant.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def tensor_headers(files):
    """``(name, shape, dtype)`` of every tensor in the safetensors ``files``, read from their headers (no
    tensor data); ``dtype`` is safetensors' string (``"F32"``, ``"I32"``, ``"U8"``, ...)."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = st.get_slice(key)
                yield key, sl.get_shape(), sl.get_dtype()


def _ppl(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def table(report: dict) -> str:
    """The before/after table (Markdown) of a report."""
    ev = report.get("evaluation") or {}
    label = f"PPL ({ev.get('dataset', '?')}, {ev.get('windows', '?')} x {ev.get('seq_len', '?')} tokens)"
    q = report["quantization"]
    timing = report.get("timings", {})
    desc = describe(report["config"])
    rows = [f"| model | {label} | checkpoint (MiB) | quantization (s) |", "|---|---|---|---|",
            (f"| {report['model_name']} ({report.get('dtype', 'float32')}) | {_ppl(ev.get('before'))} | "
             f"{report.get('source_mib', '—')} | — |"),
            (f"| {desc} | {_ppl(ev.get('after'))} | {report['checkpoint_bytes'] / 2**20:.1f} | "
             f"{timing.get('quantize', q.get('quantization_seconds', 0)):.1f} |")]
    return "\n".join(rows)


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
    from huggingface_hub import ModelCard, ModelCardData

    from hfquant.mixed_output import card_section

    from hfquant.recipe import looks_local

    model = recipe["model"]
    data = ModelCardData(library_name="transformers", tags=["hfquant", report["config"]["method"], "quantized"],
                         base_model=None if looks_local(model) else model, pipeline_tag="text-generation")
    repo = recipe["hub"]["repo_id"] or "path/to/this/folder"
    cal = report["quantization"].get("calibration", {})
    body = f"""
# {name}

`{report['model_name']}` quantized with hfquant {report['versions']['hfquant']}: {describe(report['config']).removeprefix('hfquant ')}.

## How to load

```python
import hfquant  # registers quant_method "hfquant" with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

Without `import hfquant`, loading fails loudly (size mismatch) instead of returning a broken model.

## Measured

{table(report)}

Calibration: {cal.get('shape', ['—', '—'])[0]} windows x {cal.get('shape', ['—', '—'])[-1]} tokens, data hash
`{cal.get('fingerprint', '—')}`. Every number above was measured by this run; the per-layer errors,
timings and package versions are in `report.json`, the exact recipe in `hfquant_recipe.yaml`
(`hfquant run hfquant_recipe.yaml` reproduces it).

{card_section(report, folder)}"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(str(folder / CARD))


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT).write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")


def check_checkpoint(folder) -> Path:
    """Raise ``CheckpointError`` unless ``folder`` holds a readable config.json and safetensors files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r}: " + ("is a file, not a checkpoint folder" if folder.exists()
                                                       else "no such folder"))
    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(folder)!r}: no config.json; give a folder written by `hfquant run`") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(config)!r}: unreadable or not JSON ({type(exc).__name__})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(folder)!r}: no *.safetensors files; give a folder written by `hfquant run`")
    for f in files:
        try:
            for _ in tensor_headers([f]):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{str(f)!r}: not a valid safetensors file ({str(exc).splitlines()[0][:120] or type(exc).__name__}); "
                                  "re-run `hfquant run` or re-download it") from None
    return folder


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"{str(path)!r}: unreadable or not JSON") from None
