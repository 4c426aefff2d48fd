"""Convert a saved hfquant checkpoint into the GPTQ layout or compressed-tensors, file to file.

The conversion reads the hfquant safetensors shards tensor by tensor (never the whole model at once),
rewrites the tensors of each quantized module, copies every other tensor unchanged, keeps the shard
names, and replaces ``quantization_config`` in ``config.json``. Other files (tokenizer, generation
config, ...) are copied. The model's module types (Linear vs GPT-2 ``Conv1D``, which Linears exist,
the decoder blocks) come from instantiating the architecture on the meta device.

A checkpoint with quantized Mixture-of-Experts experts (saved under transformers' internal names, fused
``[experts, ...]`` projections) is written under the names of the family's own checkpoints, one Linear per
expert and projection, and its other tensors renamed as transformers renames them when it saves the float
model (``hfquant.formats.export_experts``).

The output is written to a temporary folder next to ``out_dir`` and renamed into place at the end, so a
failed export leaves nothing half-written, and an existing non-empty ``out_dir`` is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
import torch
import transformers

from hfquant.config import HFQuantConfig
from hfquant.core.errors import FormatError
from hfquant.core.weight_format import format_from_fields
from hfquant.formats.compressed_tensors import ct_writer
from hfquant.formats.export_experts import export_names, ExportNames, piece_tensors
from hfquant.formats.files import place
from hfquant.formats.gguf import export_gguf, GGUF_FILE, write_gguf
from hfquant.formats.gptq import gptq_writer
from hfquant.formats.onnx import build_onnx, check_accuracy_level, check_onnx_exportable, check_onnx_graph, ONNX_FILE
from hfquant.formats.onnx_rewrite import rewrite_matmuls, write_dequantized

EXPORT_FORMATS = ("gptq", "compressed-tensors", "gguf", "onnx")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "chat_template.jinja")
_W4A16_KEYS = ("weight", "scales", "zeros", "g_idx")
_W8A8_KEYS = ("weight", "weight_scale", "input_scale")
SAFE_INDEX = "model.safetensors.index.json"


class HFQuantCheckpoint:
    """Read access to a saved hfquant checkpoint: its config, tensor names and quantized modules."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise FormatError(f"{self.folder}: no config.json; expected a folder written by save_pretrained of an hfquant model")
        self.config = json.loads(cfg_path.read_text())
        q = self.config.get("quantization_config") or {}
        if q.get("quant_method") != "hfquant":
            raise FormatError(
                f"{self.folder}: quantization_config.quant_method is {q.get('quant_method')!r}; expected 'hfquant' "
                "(export converts hfquant checkpoints; quantize with HFQuantConfig and save_pretrained first)"
            )

        self.qconfig = HFQuantConfig.from_dict(q)
        index = self.folder / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FormatError(f"{self.folder}: no model.safetensors or {SAFE_INDEX} (hfquant saves safetensors only)")
        self.weight_map: dict[str, str] = weight_map
        self.w8a8 = self.qconfig.method == "smoothquant"
        marker = "input_scale" if self.w8a8 else "zeros"
        self.modules = sorted(k[: -len(marker) - 1] for k in weight_map if k.endswith("." + marker))
        self._handles: dict[str, object] = {}
        self._meta = None
        self._names: ExportNames | None = None

    @property
    def module_of(self) -> dict[str, str | None]:
        """Every tensor key -> the quantized module it belongs to (``None`` for the other tensors)."""
        modules, local = set(self.modules), (*_W4A16_KEYS, *_W8A8_KEYS, "bias")
        out = {}
        for key in self.weight_map:
            prefix, _, tail = key.rpartition(".")
            out[key] = prefix if prefix in modules and tail in local else None
        return out

    def export_names(self) -> ExportNames:
        """Where each tensor goes in a GPTQ / compressed-tensors export (``hfquant.formats.export_experts``)."""
        if self._names is None:
            self._names = export_names(self.meta_model(), self.module_of, self.modules, self.w8a8)
        return self._names

    def tensor(self, key: str) -> torch.Tensor:
        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = safe_open(self.folder / name, "pt")
        return self._handles[name].get_tensor(key)

    def module_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Local name -> tensor for quantized module ``name`` (``bias`` included when present)."""
        keys = _W8A8_KEYS if self.w8a8 else _W4A16_KEYS
        out = {k: self.tensor(f"{name}.{k}") for k in keys}
        if f"{name}.bias" in self.weight_map:
            out["bias"] = self.tensor(f"{name}.bias")
        return out

    def meta_model(self):
        """The architecture on the meta device (module types and names only; no weights are read), built once."""
        if self._meta is None:
            self._meta = self._build_meta_model()
        return self._meta

    def _build_meta_model(self):
        cfg_dict = {k: v for k, v in self.config.items() if k != "quantization_config"}
        config = transformers.AutoConfig.for_model(**cfg_dict)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        with torch.device("meta"):
            if cls is not None:
                return cls(config)
            return transformers.AutoModel.from_config(config)


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FormatError(f"{out}: already exists and is not an empty folder; choose a new output folder (nothing was written)")


def _converted(ckpt: HFQuantCheckpoint, name: str, convert_module) -> dict[str, torch.Tensor]:
    """The export's tensors of quantized module ``name``: one Linear, or every expert's Linears of a fused
    projection, each converted by ``convert_module(exported name, hfquant tensors)``."""
    names, tensors = ckpt.export_names(), ckpt.module_tensors(name)
    if name not in names.experts:
        return convert_module(names.modules[name], tensors)
    out: dict[str, torch.Tensor] = {}
    for piece in names.experts[name]:
        out.update(convert_module(piece.name, piece_tensors(tensors, piece)))
    return out


def _write_shards(ckpt: HFQuantCheckpoint, tmp: Path, convert_module) -> None:
    """Write ``tmp``'s shards: each quantized module's tensors converted (``_converted``) in the shard that held
    its ``weight``; all other tensors copied, under their exported names (``HFQuantCheckpoint.export_names``)."""
    module_of, renamed = ckpt.module_of, ckpt.export_names().tensors
    shards: dict[str, list[str]] = {}
    for key, shard in ckpt.weight_map.items():
        shards.setdefault(shard, []).append(key)
    new_map: dict[str, str] = {}
    total = 0
    for shard, keys in sorted(shards.items()):
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            name = module_of[key]
            if name is None:
                out[renamed[key]] = ckpt.tensor(key)
            elif key == f"{name}.weight":
                out.update(_converted(ckpt, name, convert_module))
        out = {k: v.contiguous() for k, v in out.items()}
        save_file(out, str(tmp / shard), metadata={"format": "pt"})
        for k, v in out.items():
            new_map[k] = shard
            total += v.numel() * v.element_size()
    if (ckpt.folder / SAFE_INDEX).is_file():
        (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, indent=2))


def _copy_other_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (SAFE_INDEX, "config.json"):
            shutil.copy2(p, dst / p.name)


def check_exportable(qconfig, fmt: str, folder: Path) -> None:
    """Raise ``FormatError`` when a module of the checkpoint is stored in a weight format that ``fmt`` cannot hold
    (``WeightFormat.exports``): it would otherwise be copied into the export as tensors no reader understands."""
    for name, entry in (qconfig.module_schemes or {}).items():
        wf = format_from_fields(entry)
        if fmt not in wf.exports:
            raise FormatError(f"{folder}: {name} holds {wf.describe()}, which a {fmt} checkpoint cannot store (this "
                              f"weight format is written as {list(wf.exports)}); keep save_format hfquant")


def _write_onnx(src_dir, tmp: Path, tokenizer_dir=None, accuracy_level: int = 1) -> None:
    """The ONNX Runtime version of ``src_dir`` in ``tmp`` (``hfquant.formats.onnx``): the builder's graph of a float
    copy of the de-quantized checkpoint (with the tokenizer beside it), whose quantized MatMuls are then rewritten
    over hfquant's codes (``hfquant.formats.onnx_rewrite``); the written graph is checked."""
    check_accuracy_level(accuracy_level)
    ckpt = HFQuantCheckpoint(src_dir)
    check_onnx_exportable(ckpt.qconfig, ckpt.folder, bool(ckpt.export_names().experts))
    work = Path(tempfile.mkdtemp(prefix=f".{tmp.name}.source-", dir=tmp.parent))
    try:
        codes = write_dequantized(ckpt, work)
        for folder in [ckpt.folder] + ([Path(tokenizer_dir)] if tokenizer_dir else []):
            for name in _TOKENIZER_FILES:
                if (folder / name).is_file() and not (work / name).exists():
                    shutil.copy2(folder / name, work / name)
        build_onnx(work, tmp, accuracy_level)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rewrite_matmuls(tmp / ONNX_FILE, codes, accuracy_level)
    counts = check_onnx_graph(tmp / ONNX_FILE, len(ckpt.modules))
    (tmp / "hfquant_onnx.json").write_text(json.dumps({
        "quantization_config": ckpt.config["quantization_config"], "accuracy_level": accuracy_level,
        "weights_by_op": counts}, indent=2))


def convert_into(src_dir: str | os.PathLike, fmt: str, tmp: Path, checkpoint_format: str = "gptq",
                 tokenizer_dir=None, accuracy_level: int = 1) -> None:
    """Write the ``fmt`` version of hfquant checkpoint ``src_dir`` into the existing empty folder ``tmp``
    (``tokenizer_dir``: where a GGUF or ONNX export finds the tokenizer when ``src_dir`` has none;
    ``accuracy_level``: ONNX only, ``hfquant.formats.onnx``)."""
    if fmt == "gguf":
        write_gguf(src_dir, tmp / GGUF_FILE, tokenizer_dir=tokenizer_dir)
        return
    if fmt == "onnx":
        _write_onnx(src_dir, tmp, tokenizer_dir, accuracy_level)
        return
    ckpt = HFQuantCheckpoint(src_dir)
    check_exportable(ckpt.qconfig, fmt, ckpt.folder)
    if not ckpt.modules:
        raise FormatError(f"{ckpt.folder}: no quantized modules found in the checkpoint; nothing to export")
    if ckpt.qconfig.lm_head_bits is not None:
        raise FormatError(f"{ckpt.folder}: its output head is quantized (lm_head_bits: {ckpt.qconfig.lm_head_bits}), "
                          f"which {fmt} checkpoints here do not carry (their head is float); keep save_format hfquant, "
                          "or quantize again with lm_head_bits: null to export")
    if fmt == "gptq":
        convert, write_config = gptq_writer(ckpt, checkpoint_format)
    elif fmt == "compressed-tensors":
        convert, write_config = ct_writer(ckpt)
    else:
        raise FormatError(f"format: got {fmt!r}; expected one of {list(EXPORT_FORMATS)}")
    _write_shards(ckpt, tmp, convert)
    _copy_other_files(ckpt.folder, tmp)
    write_config(dict(ckpt.config), tmp)


def export_checkpoint(src_dir: str | os.PathLike, fmt: str, out_dir: str | os.PathLike,
                      checkpoint_format: str = "gptq", accuracy_level: int = 1, **gguf_options) -> Path:
    """Export the hfquant checkpoint ``src_dir`` to ``fmt`` (``"gptq"``, ``"compressed-tensors"``, ``"gguf"`` or
    ``"onnx"``) in ``out_dir``. For ``"gguf"`` (``hfquant.formats.gguf.export_gguf``, whose ``gguf_options`` it
    takes) ``src_dir`` may also be a float checkpoint, written in ``float_type``; the result is
    ``out_dir/model.gguf``. For ``"onnx"`` (``hfquant.formats.onnx``) the result is ``model.onnx`` with its
    weights file, ``genai_config.json`` and the tokenizer; ``accuracy_level`` is MatMulNBits' (1 or 4).

    ``out_dir`` must not exist or be an empty folder; the result is written to a temporary folder beside it
    and renamed into place, so a failure leaves nothing behind. ``checkpoint_format`` (GPTQ only):
    ``"gptq"`` (v1, the default, read everywhere) or ``"gptq_v2"``. Raises ``FormatError`` (one line) for
    what the target format cannot express. Returns ``out_dir``.
    """
    if fmt not in EXPORT_FORMATS:
        raise FormatError(f"format: got {fmt!r}; expected one of {list(EXPORT_FORMATS)}")
    if fmt == "gguf":
        export_gguf(src_dir, out_dir, **gguf_options)
        return Path(out_dir)
    out = Path(out_dir)
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        convert_into(src_dir, fmt, tmp, checkpoint_format, accuracy_level=accuracy_level)
        _check_out_dir(out)  # still missing or empty: place() only moves the finished folder in
        place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pretrained_as(save_hfquant: Callable[..., object], save_directory: str | os.PathLike, fmt: str,
                       tokenizer_dir=None, **kwargs) -> None:
    """``model.save_pretrained`` for ``save_format`` ``fmt`` != ``"hfquant"``: save the hfquant layout to a
    temporary folder with ``save_hfquant(folder, **kwargs)`` (the model class's own bound ``save_pretrained``),
    convert, then move the files into ``save_directory`` (replacing older weight files there, as
    ``save_pretrained`` does)."""
    if kwargs.get("push_to_hub"):
        raise FormatError(f"save_pretrained(push_to_hub=True) with save_format={fmt!r} is not supported; save locally, then upload the folder")
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise FormatError(f"{out}: exists and is not a folder; save_pretrained needs a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        src, dst = work / "hfquant", work / fmt
        dst.mkdir()
        save_hfquant(src, **kwargs)
        convert_into(src, fmt, dst, tokenizer_dir=tokenizer_dir)
        out.mkdir(exist_ok=True)
        olds = [out / SAFE_INDEX, out / "quantize_config.json", out / GGUF_FILE, out / ONNX_FILE,
                out / f"{ONNX_FILE}.data", out / "genai_config.json", out / "hfquant_onnx.json"]
        for old in list(out.glob("model*.safetensors")) + olds:
            if old.is_file():
                old.unlink()
        for p in dst.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
