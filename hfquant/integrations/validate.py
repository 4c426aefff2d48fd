"""Checking a saved checkpoint folder against its own ``config.json`` before any work: ``validate_checkpoint``.

A checkpoint whose config does not describe its tensors otherwise fails late and obscurely (transformers' load
table, then an error) or not at all (a tensor missing from the shard index loads as random weights; an export
writes a model nothing can load). From ``config.json`` and the safetensors headers only (no tensor data):

* ``config.json`` is readable; an hfquant ``quantization_config`` parses (``HFQuantConfig.from_dict``: bits, group
  size and every other field legal), and so does a GPTQ one (``hfquant.formats.load``);
* the weights: ``model.safetensors``, else the shards ``model.safetensors.index.json`` names, each entry's file
  present and holding that tensor;
* the tensors a load fills: the architecture built from ``config.json`` on the meta device, with the quantized
  skeletons a reload builds (``HFQuantQuantizer.preprocess_model``: the same modules, shapes and dtypes), its keys
  matched to the stored ones as transformers renames them. Every one must be stored (tied weights and the
  model's ignorable keys excepted), with the same shape; integer tensors with the same dtype (a float tensor may
  be stored in any float dtype: transformers casts it to the model's).

The first problem raises ``CheckpointError``: one line naming the tensor (or field), what the files hold, what the
config expects and what to do. Another tool's quantized layout (compressed-tensors, AWQ, ...) and an architecture
transformers cannot build here are checked as far as the files go (index, headers).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from hfquant.config import HFQuantConfig
from hfquant.core.errors import HFQuantError
from hfquant.formats.export import SAFE_INDEX
from hfquant.formats.files import CheckpointError, tensor_headers
from hfquant.formats.gptq import GPTQImportLinear
from hfquant.formats.gptq_experts import imported_experts
from hfquant.formats.load import gptq_to_hfquant_config, read_gptq_config
from hfquant.integrations.transformers import HFQuantQuantizer
from hfquant.core.weight_format import WeightFormat
from hfquant.nn.w8a8 import QuantLinearW8A8

try:  # how transformers renames checkpoint keys on load (MoE experts, legacy names); absent: keys compared as stored
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import rename_source_key, WeightConverter
except ImportError:  # pragma: no cover - another transformers 5 layout
    get_model_conversion_mapping = None

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_INCOMPLETE = "the checkpoint is incomplete: re-download it, or save the model again"
_FIX = "restore the checkpoint's own config.json and weights (re-download them), or quantize and save it again"


def validate_checkpoint(folder) -> Path:
    """Check the checkpoint folder ``folder`` (see the module docstring); return it as a ``Path``.

    Raises:
        CheckpointError: one line naming the first problem and the fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r}: " + ("is a file, not a checkpoint folder" if folder.exists()
                                                       else "no such folder"))
    config = _read_config(folder)
    stored, listed_by = _stored_tensors(folder)
    model = _expected_model(folder, config)
    if model is not None:
        _compare(folder, model, stored, listed_by)
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if ggufs:
            raise CheckpointError(f"{str(folder)!r}: holds {ggufs[0]}, a GGUF file, and no config.json: this command "
                                  "reads safetensors checkpoints (save_format hfquant)") from None
        raise CheckpointError(f"{str(folder)!r}: no config.json; give a folder written by `hfquant run` "
                              "(or save_pretrained)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r}: unreadable or not JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r}: not a JSON object; {_FIX}")
    return config


def _headers(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        return {key: (tuple(shape), dtype) for key, shape, dtype in tensor_headers([file])}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        detail = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
        raise CheckpointError(f"{str(file)!r}: not a valid safetensors file ({detail}); re-run `hfquant run` or "
                              "re-download it") from None


def _stored_tensors(folder: Path) -> tuple[dict[str, tuple[tuple[int, ...], str, str]], str]:
    """``{name: (shape, safetensors dtype, file name)}`` of the tensors a load reads (``model.safetensors``, else those
    the shard index lists), and the file that lists them."""
    if (folder / SINGLE_FILE).is_file():
        return {k: (*v, SINGLE_FILE) for k, v in _headers(folder / SINGLE_FILE).items()}, SINGLE_FILE
    index = folder / SAFE_INDEX
    if not index.is_file():
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        raise CheckpointError(f"{str(folder)!r}: no {SINGLE_FILE} or {SAFE_INDEX}" +
                              (f" (only {', '.join(found[:3])})" if found else "") +
                              "; give a folder written by `hfquant run` (or save_pretrained)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{str(index)!r}: unreadable, or not JSON with a weight_map of tensor name -> file; "
                              f"{_FIX}") from None
    shards: dict[str, dict] = {}
    stored = {}
    for key, name in weight_map.items():
        if name not in shards:
            if Path(name).name != name or not (folder / name).is_file():
                raise CheckpointError(f"{str(index)!r}: lists {key} in {name}, which is not in the folder; {_FIX}")
            shards[name] = _headers(folder / name)
        if key not in shards[name]:
            raise CheckpointError(f"{str(index)!r}: lists {key} in {name}, which holds no such tensor; {_FIX}")
        stored[key] = (*shards[name][key], name)
    return stored, SAFE_INDEX


def _quantization(folder: Path, config: dict) -> HFQuantConfig | None | bool:
    """The ``HFQuantConfig`` a load builds skeletons from: ``None`` for a float checkpoint, ``False`` for another
    tool's layout (its tensors are not checked here)."""
    q = config.get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else None
    if q is None:
        return None
    if method == "hfquant":
        try:
            return HFQuantConfig.from_dict(q)
        except HFQuantError as exc:
            message = str(exc).replace("HFQuantConfig.", "quantization_config.").replace("HFQuantConfig:",
                                                                                         "quantization_config:")
            raise CheckpointError(f"{str(folder / 'config.json')!r}: {message}; {_FIX}") from None
    if method == "gptq":
        try:
            return gptq_to_hfquant_config(read_gptq_config(folder))
        except HFQuantError as exc:
            raise CheckpointError(f"{str(folder / 'config.json')!r}: {exc}") from None
    return False


def _expected_model(folder: Path, config: dict):
    """The model a load builds (meta device, quantized skeletons in place), or ``None`` when it cannot be built here
    (another tool's quantized layout, an architecture transformers does not know)."""
    hq = _quantization(folder, config)
    if hq is False:
        logger.debug("%s: quantization_config.quant_method %r is not hfquant's or GPTQ: tensors not checked", folder,
                     config["quantization_config"].get("quant_method"))
        return None
    try:
        model_config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, remote code: transformers' own error at load time
        logger.debug("%s: config.json does not build here (%s): tensors not checked", folder, exc)
        return None
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    archs = getattr(model_config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    dtype = getattr(model_config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32"), torch.float32)
    try:
        with torch.device("meta"):
            auto = transformers.AutoModelForCausalLM
            model = cls(model_config) if cls is not None else auto.from_config(model_config)
    except Exception as exc:  # noqa: BLE001 - as above
        logger.debug("%s: the architecture does not build here (%s): tensors not checked", folder, exc)
        return None
    if hq is not None:
        files = sorted(str(p) for p in folder.glob("*.safetensors"))
        try:
            HFQuantQuantizer(hq, pre_quantized=True).preprocess_model(model, dtype=dtype, checkpoint_files=files)
        except (HFQuantError, ValueError) as exc:
            message = str(exc).removeprefix("hfquant: ")
            raise CheckpointError(f"{str(folder / 'config.json')!r}: its quantization_config does not fit the "
                                  f"model it describes ({message}); {_FIX}") from None
    return model


def _rename(model, stored: dict, expected: dict) -> tuple[dict, set[str], list[str]]:
    """Stored keys -> the model's keys, as transformers renames them on load. Returns ``{model key: stored key}`` for
    one-to-one tensors, the model keys that conversions fill (merged or split: shapes not compared) and the patterns
    of those conversions' targets (expected keys they produce count as present)."""
    if get_model_conversion_mapping is None:
        return {k: k for k in stored}, set(), []
    conversions = get_model_conversion_mapping(model)
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    one_to_one, converted, patterns = {}, set(), []
    for key in stored:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if pattern is None:
            one_to_one[target] = key
        else:
            converted.add(target)
    for c in converters:
        if getattr(c, "_was_used", True):
            patterns += list(c.target_patterns)
    return one_to_one, converted, patterns


def _produced_by(key: str, patterns: list[str]) -> bool:
    for p in patterns:
        try:
            if re.search(p.replace("*", r"[^.]+"), key):
                return True
        except re.error:
            return True  # a pattern this check cannot read: do not claim the tensor is missing
    return False


def _compare(folder: Path, model, stored: dict, listed_by: str) -> None:
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignorable = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    stored_as, converted, patterns = _rename(model, stored, expected)
    imported = tuple(f"{n}." for n in imported_experts(model))  # filled from per-expert GPTQ Linears, not by name
    bad = []  # model keys missing or not fitting, in model order
    for key, tensor in expected.items():
        source = stored_as.get(key)
        if source is None:
            optional = (key in tied or key in converted or any(p.search(key) for p in ignorable)
                        or _produced_by(key, patterns) or key.startswith(imported or ("\0",)))
            if not optional:
                bad.append(key)
        elif not _fits(stored[source], tensor):
            bad.append(key)
    if not bad:
        return
    key, more = bad[0], len(bad) - 1
    source = stored_as.get(key)
    if source is None:
        message, fix = _missing(folder, model, key, listed_by), _INCOMPLETE
    else:
        shape, dtype, file = stored[source]
        tensor = expected[key]
        want = "a float" if tensor.dtype.is_floating_point else _DTYPES.get(tensor.dtype, str(tensor.dtype))
        message = (f"{str(folder)!r}: {source} in {file} is {dtype} {list(shape)}, but config.json "
                   f"({_describe(model, key)}) expects {want} tensor {list(tensor.shape)}")
        fix = f"the config and the tensors do not belong together: {_FIX}"
    raise CheckpointError(message + (f" ({more} more tensors are wrong or missing)" if more else "") + f"; {fix}")


def _fits(stored: tuple, tensor: torch.Tensor) -> bool:
    """Whether a stored ``(shape, dtype, file)`` loads into ``tensor``: the same shape; for a float tensor any float
    dtype (transformers casts it), else the same dtype."""
    shape, dtype, _ = stored
    if shape != tuple(tensor.shape):
        return False
    if tensor.dtype.is_floating_point:
        return dtype.startswith(("F", "BF"))
    return dtype == _DTYPES.get(tensor.dtype)


def _missing(folder: Path, model, key: str, listed_by: str) -> str:
    hint = ""
    if listed_by == SAFE_INDEX:
        holders = [p.name for p in sorted(folder.glob("*.safetensors")) if key in _headers(p)]
        if holders:
            hint = f" ({holders[0]} holds it, but the index does not list it)"
    return (f"{str(folder)!r}: {key}, which config.json's {type(model).__name__} needs, is missing from "
            f"{listed_by}{hint}")


def _describe(model, key: str) -> str:
    """What the config makes of the module that owns ``key``, for the message."""
    name = key.rpartition(".")[0]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return "the model it describes"
    if isinstance(module, GPTQImportLinear):
        return f"{name}: GPTQ {module.bits}-bit, group_size {module.group_size}"
    if isinstance(getattr(module, "format", None), WeightFormat):
        return f"{name}: {module.format.describe()}"
    if isinstance(module, QuantLinearW8A8):
        return f"{name}: W8A8 int8"
    return f"{name}: {type(module).__name__}"
