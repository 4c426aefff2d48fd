"""The Python entry points that quantize a model outside ``from_pretrained``: ``quantize_`` (a loaded model, in
place) and ``quantize_layerwise`` (load and quantize one decoder layer at a time). Both drive the transformers
quantizer (``hfquant.integrations.transformers``), so the result saves and reloads like a model quantized at load."""

from __future__ import annotations

from dataclasses import fields

import torch

from hfquant.calibration.onload import empty_model, LayerLoader, local_folder
from hfquant.config import HFQuantConfig
from hfquant.core.errors import ConfigError
from hfquant.formats.gptq import GPTQImportLinear
from hfquant.integrations.transformers import HFQuantQuantizer
from hfquant.nn.gguf import QuantLinearGGUF
from hfquant.nn.stored import QuantLinearStored
from hfquant.nn.w8a8 import QuantLinearW8A8
from hfquant.nn.weight_only import QuantLinearWeightOnly
from hfquant.quantize.entry import RunRequest

_QUANTIZED_MODULES = (QuantLinearWeightOnly, QuantLinearW8A8, QuantLinearGGUF, QuantLinearStored, GPTQImportLinear)
# quantize_layerwise's ``options``: how the model loads, and the run settings it does not set itself
_LAYERWISE_OPTIONS = ("revision", "trust_remote_code",
                      *(f.name for f in fields(RunRequest) if f.name not in ("onload", "activations", "offload_folder")))


def _as_config(config) -> HFQuantConfig:
    """``config`` as an ``HFQuantConfig``: one, or a dict of its fields (validated as the constructor does)."""
    if isinstance(config, HFQuantConfig):
        return config
    if isinstance(config, dict):
        return HFQuantConfig(**config)
    raise ConfigError(f"hfquant.quantize_: config must be an HFQuantConfig or a dict of its fields, got "
                      f"{type(config).__name__}; e.g. quantize_(model, HFQuantConfig(bits=4))")


def _check_not_quantized(model) -> None:
    """Refuse a model that is already quantized (by hfquant or another method): quantizing it again would round
    rounded weights, or silently keep the old scheme."""
    found = next((n for n, m in model.named_modules() if isinstance(m, _QUANTIZED_MODULES)), None)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if found is None and not qc and getattr(model, "hf_quantizer", None) is None:
        return
    method = (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) or "hfquant"
    where = f" ({found} is a quantized module)" if found else ""
    raise ConfigError(f"hfquant.quantize_: the model is already quantized (quant_method {method!r}){where}; load the "
                      "float model and quantize that")


def quantize_(model, config, **options) -> dict:
    """Quantize an already loaded float transformers model in place (the torchao ``quantize_`` convention),
    exactly as ``from_pretrained(..., quantization_config=config)`` would (same skip list, config and report),
    so it saves and reloads like one. The model may be in float32, bfloat16 or float16 and on any device:
    calibration runs where its weights are. A model that is already quantized is refused (``ConfigError``).
    ``config`` (an ``HFQuantConfig``, or a dict of its fields) is not modified: the resolved
    config is ``model.config.quantization_config``. ``options`` go to ``quantize_loaded_model_``
    (``windows``, ``progress``, ``store``). Returns ``model.hfquant_report``.
    """
    config = _as_config(config)
    _check_not_quantized(model)
    quantizer = HFQuantQuantizer(config, pre_quantized=False)
    quantizer.run_options = options
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model.hfquant_report


def quantize_layerwise(model, config, *, device="cpu", dtype=torch.float32, activations: str = "device",
                       offload_folder=None, **options):
    """Load and quantize a model a decoder layer at a time, never holding all its float weights.

    ``model`` is a local folder (or Hub id) with safetensors weights. Returns the quantized model, the same
    module for module and bit for bit as ``from_pretrained(model, dtype=dtype)`` followed by
    ``quantize_(model, config)``, ready for ``save_pretrained``. ``activations`` says where the
    calibration hidden states live between blocks: ``"device"`` (the execution device), ``"cpu"`` or
    ``"disk"`` (safetensors files in a temporary folder under ``offload_folder``; quantized modules are then
    recomputed rather than having their outputs cached). ``config`` is not modified (the resolved config is
    the returned model's ``config.quantization_config``). ``options``: ``revision`` and ``trust_remote_code``
    (how the model loads, as in ``from_pretrained``; default ``None`` and ``False``), the rest go to
    ``quantize_loaded_model_`` (``windows``, ``progress``, ``store``, ``dist``); any other key is a ``ConfigError``.
    """
    unknown = sorted(set(options) - set(_LAYERWISE_OPTIONS))
    if unknown:
        raise ConfigError(f"hfquant.quantize_layerwise: unknown option {', '.join(map(repr, unknown))}; the options "
                          f"are {', '.join(_LAYERWISE_OPTIONS)} (and device, dtype, activations, offload_folder)")
    revision, trust_remote_code = options.pop("revision", None), options.pop("trust_remote_code", False)
    folder = local_folder(str(model), revision)
    skeleton = empty_model(folder, dtype, revision=revision, trust_remote_code=trust_remote_code)
    loader = LayerLoader(skeleton, folder, device, dtype)
    loader.load_outside()
    report = quantize_(skeleton, config, onload=loader, activations=activations, offload_folder=offload_folder,
                       **options)
    report["layerwise"] = {"activations": activations, "read_seconds": loader.seconds}
    return skeleton
