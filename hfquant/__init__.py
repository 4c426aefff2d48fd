"""hfquant: post-training quantization (GPTQ, RTN, SmoothQuant) for Hugging Face transformers models.

``import hfquant`` imports torch only. It registers ``quant_method: "hfquant"`` with transformers as soon
as transformers' quantizer registry is imported (now, if it already is), so that
``from_pretrained(saved_dir)`` of an hfquant checkpoint works after ``import hfquant``.

The public API (``__all__``), each name loaded from its module on first access (``_LAZY``):

* ``HFQuantConfig``: the configuration, ``from_pretrained(..., quantization_config=HFQuantConfig(...))``;
* ``quantize_(model, config)``, ``quantize_layerwise(path, config)``: quantize a loaded model in place, or
  load and quantize one decoder layer at a time;
* ``QuantLinearWeightOnly`` (2/3/4/8-bit weights, float activations), ``QuantLinearW8A8``: the quantized modules;
* ``export_checkpoint(src, fmt, out)``, ``load_gptq(path)``: GPTQ / compressed-tensors export, GPTQ import;
* ``perplexity(model, tokenizer, text)``: the evaluation;
* ``HFQuantQuantizer``: the transformers quantizer behind ``quant_method: "hfquant"``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_REGISTRY_MODULE = "transformers.quantizers.auto"
# public name -> the module that defines it (imported on first access, see __getattr__)
_LAZY = {
    "HFQuantConfig": "hfquant.config",
    "quantize_": "hfquant.api",
    "quantize_layerwise": "hfquant.api",
    "QuantLinearWeightOnly": "hfquant.nn.weight_only",
    "QuantLinearW8A8": "hfquant.nn.w8a8",
    "export_checkpoint": "hfquant.formats",
    "load_gptq": "hfquant.formats",
    "perplexity": "hfquant.eval.perplexity",
    "HFQuantQuantizer": "hfquant.integrations.transformers",
}

__all__ = list(_LAZY)


def _register() -> None:
    partial = sys.modules.get("hfquant.integrations.transformers")
    if partial is not None and not getattr(partial, "_READY", False):
        return  # it is being imported right now and registers itself when done
    # lazy: `import hfquant` imports torch only; the quantizer (and transformers) load when they are needed
    from hfquant.integrations.transformers import register

    register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers' quantizer registry so hfquant registers right after it loads."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        loader.exec_module = exec_module
        return spec


if _REGISTRY_MODULE in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        if name == "HFQuantConfig":
            _register()
        return getattr(module, name)
    raise AttributeError(f"module 'hfquant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
