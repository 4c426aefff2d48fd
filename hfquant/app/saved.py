"""What ``hfquant eval``, ``inspect`` and ``push`` read: a saved checkpoint, in one of two forms.

* a safetensors checkpoint folder (``config.json`` + weights; ``save_format`` hfquant, gptq, compressed-tensors,
  or a float model), checked against its config before anything loads (``validate_checkpoint``);
* a GGUF file: the ``model.gguf`` of an ``hfquant run`` folder with ``save_format: gguf`` (no ``config.json``), or
  any ``.gguf`` path, read back with ``load_gguf``. The tokenizer is the folder's (an ``hfquant run`` folder has
  one), else the one transformers builds from the file.

``report.json`` and ``hfquant_recipe.yaml`` are read from the folder in both cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant.app.report import describe, REPORT
from hfquant.formats.files import CheckpointError, gguf_file, read_json, tensor_headers
from hfquant.formats.gguf import load_gguf, read_gguf_header, run_label
from hfquant.integrations.validate import validate_checkpoint
from hfquant.core.schemes import summary

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Saved:
    """A checked checkpoint: ``folder`` holds it (and the run's report, recipe and tokenizer); ``gguf`` is its GGUF
    file when it is one, with ``header`` (``read_gguf_header``)."""

    folder: Path
    gguf: Path | None = None
    header: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """What to name in messages: the GGUF file, else the folder."""
        return self.gguf or self.folder


def open_saved(path, *, folder_only: bool = False) -> Saved:
    """Check ``path`` (a checkpoint folder, a GGUF run folder or a ``.gguf`` file; ``folder_only``: a folder) and
    return it. ``CheckpointError`` (one line) when it is not a readable, consistent checkpoint."""
    path = Path(path)
    file = gguf_file(path)
    if file is None:
        return Saved(validate_checkpoint(path))
    if folder_only and file == path:
        raise CheckpointError(f"{str(path)!r}: is a file; give the folder that holds it (with its tokenizer, "
                              "report and model card)")
    return Saved(file.parent, file, read_gguf_header(file))


def load_tokenizer(saved: Saved):
    """The folder's tokenizer; for a GGUF file without one beside it, the tokenizer transformers builds from it."""
    if saved.gguf is None or any((saved.folder / name).is_file() for name in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(saved.folder)
    try:
        return AutoTokenizer.from_pretrained(saved.folder, gguf_file=saved.gguf.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, KeyError, ... for what it cannot build
        raise CheckpointError(f"{str(saved.gguf)!r}: no tokenizer beside it ({_TOKENIZER_FILES[0]}) and transformers "
                              f"cannot build one from the file ({type(exc).__name__}); put the model's tokenizer files "
                              f"in {str(saved.folder)!r}") from None


def load_model(saved: Saved, dtype: str = "auto"):
    """The saved model in evaluation mode: ``from_pretrained`` (in ``dtype``: ``"auto"``, its own, or a torch dtype's
    name), or ``load_gguf`` (the file's blocks in hfquant modules; a float GGUF as transformers reads it; cast to
    ``dtype`` unless ``"auto"``)."""
    if saved.gguf is not None:
        model = load_gguf(saved.gguf, float_ok=True).eval()
        return model if dtype == "auto" else model.to(getattr(torch, dtype))
    return AutoModelForCausalLM.from_pretrained(saved.folder, use_safetensors=True,
                                                dtype=dtype if dtype == "auto" else getattr(torch, dtype)).eval()


def checkpoint_lines(saved: Saved) -> list[str]:
    """``hfquant inspect``'s description of the checkpoint: architecture, quantization, sizes."""
    return _gguf_lines(saved) if saved.gguf is not None else _safetensors_lines(saved.folder)


def _safetensors_lines(folder: Path) -> list[str]:
    config = read_json(folder / "config.json")
    qc = config.get("quantization_config") or {}
    lines = [f"{folder}: {config.get('model_type', '?')} ({', '.join(config.get('architectures') or ['?'])})"]
    if qc.get("quant_method") == "hfquant":
        lines += [f"quantization: {describe(qc)}",
                  "  " + ", ".join(f"{k}={v}" for k, v in qc.items()
                                   if k not in ("quant_method", "modules_to_not_convert", "module_schemes")),
                  f"  kept float: {', '.join(qc.get('modules_to_not_convert') or []) or '-'}"]
        if qc.get("module_schemes"):
            lines.append(f"  per-module schemes: {summary(qc['module_schemes'])}")
    else:
        lines.append("quantization: none (not an hfquant checkpoint)")
    by_dtype: dict[str, int] = {}
    quantized = []
    files = sorted(folder.glob("*.safetensors"))
    total_bytes = sum(f.stat().st_size for f in files)
    for key, shape, dtype in tensor_headers(files):
        by_dtype[dtype] = by_dtype.get(dtype, 0) + math.prod(shape)
        if key.endswith((".scales", ".weight_scale")):
            quantized.append(key.rsplit(".", 1)[0])
    lines += [f"size: {total_bytes / 2**20:.1f} MiB in safetensors; elements by dtype: "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(by_dtype.items())),
              f"quantized modules: {len(quantized)}"]
    return lines


def _gguf_lines(saved: Saved) -> list[str]:
    h, linears = saved.header, saved.header["linears"]
    config = (read_json(saved.folder / REPORT) or {}).get("config")
    quantization = (f"{describe(config)}, {run_label(config)}" if config
                    else "GGUF blocks (no report.json beside the file)")
    types = sorted(h["types"].items(), key=lambda kv: -kv[1]["bytes"])
    return [f"{saved.gguf}: GGUF {h['architecture'] or '?'} ({h['name'] or '-'})",
            f"quantization: {quantization}",
            f"size: {h['bytes'] / 2**20:.1f} MiB in {saved.gguf.name}; tensors by type: "
            + ", ".join(f"{kind} {t['tensors']} ({t['elements']:,} values, {t['bytes'] / 2**20:.2f} MiB)"
                        for kind, t in types),
            f"quantized modules: {linears['tensors']}"
            + (f" ({linears['stored_bits']:.4f} stored bits per weight)" if linears["stored_bits"] else "")]
