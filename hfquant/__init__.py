"""hfquant: post-training quantization (GPTQ, RTN) for Hugging Face transformers models.

``import hfquant`` imports torch only. It registers ``quant_method: "hfquant"`` with transformers as soon
as transformers' quantizer registry is imported (now, if it already is), so that
``from_pretrained(saved_dir)`` of an hfquant checkpoint works after ``import hfquant``.
``hfquant.HFQuantConfig`` imports transformers on first access.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_REGISTRY_MODULE = "transformers.quantizers.auto"
_LAZY = {
    "HFQuantConfig": "hfquant.config",
    "HFQuantQuantizer": "hfquant.integrations.transformers",
    "QuantLinearWeightOnly": "hfquant.nn.weight_only",
    "QuantLinearW8A8": "hfquant.nn.w8a8",
    "perplexity": "hfquant.eval.perplexity",
    "quantize_": "hfquant.quantize.entry",
    "quantize_layerwise": "hfquant.quantize.entry",
}

__all__ = ["__version__", *_LAZY]


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
