"""The transformers quantizer for ``quant_method: "hfquant"``.

Fresh quantization runs in ``_process_model_after_weight_loading`` (calibration needs the loaded float
model, like transformers' own GPTQ integration). Reloading a saved checkpoint swaps the Linears for quantized
skeletons before the weights load (``hfquant.formats.skeletons``), so the saved tensors load by name. The rule of
which modules a run leaves float (``modules_left_float``, ``quantized_predicate``) lives here, beside the
quantizer that applies it; ``hfquant.api`` holds ``quantize_`` / ``quantize_layerwise``.

The quantizer works on its own copy of the config it is given (``HFQuantQuantizer.__init__``): the resolved
skip list and per-module schemes go into that copy, which transformers' ``postprocess_model`` makes
``model.config.quantization_config`` (so ``config.json`` records them); the caller's object is never written.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from hfquant.config import HFQuantConfig, QUANT_METHOD
from hfquant.core.errors import ConfigError
from hfquant.formats.save_hook import install_save_format_hook
from hfquant.formats.skeletons import convert_gptq_skeletons, gptq_skeletons, hfquant_skeletons
from hfquant.kernels.jit_build import build_seconds
from hfquant.nn.experts import QuantExperts
from hfquant.nn.graph import is_quantizable, output_head_name
from hfquant.quantize.entry import quantize_loaded_model_
from hfquant.quantize.freeze import freeze_

logger = logging.getLogger(__name__)


def modules_left_float(model, skip=None, keep_in_fp32=None) -> list[str]:
    """The name patterns of the modules a run leaves in float: transformers' default skips for quantizers (the
    output head and the modules tied to it), the user's ``modules_to_not_convert`` (``skip``) and the model's
    ``_keep_in_fp32_modules`` (or ``keep_in_fp32``). The one rule that ``from_pretrained``, ``hfquant.quantize_``,
    ``hfquant run`` (also layer-wise), ``hfquant sensitivity``, the checks before loading and reloading share."""
    fp32 = keep_in_fp32 or getattr(model, "_keep_in_fp32_modules", None)
    return sorted(HfQuantizer.get_modules_to_not_convert(model, list(skip or []), list(fp32 or []),
                                                         add_default_skips=True))


def quantized_predicate(left_float: list[str]) -> Callable[[str], bool]:
    """``keep(name)``: whether the module ``name`` is quantized, given ``modules_left_float``'s patterns
    (transformers' matching: a prefix up to a module boundary, a regex, or a suffix)."""
    patterns = list(left_float)
    return lambda name: should_convert_module(name, patterns)


def keep_internal_names(model) -> None:
    """A model with quantized experts saves its tensors under the names it holds them by. transformers would save an
    MoE under its checkpoints' older per-expert names (reversing the conversions it loads them with), which the
    stacked quantized tensors do not have; and reload reads these names as they are."""
    if any(isinstance(m, QuantExperts) for m in model.modules()):
        model._weight_conversions = []


def _own_copy(config):
    """A copy of ``config`` that the quantizer may write into. A tokenizer object is shared, not copied: the run
    only reads it (and it stays out of ``config.json``)."""
    if not isinstance(config, HFQuantConfig):
        return config
    return copy.deepcopy(config, {id(config.tokenizer): config.tokenizer})


class HFQuantQuantizer(HfQuantizer):
    """The transformers ``HfQuantizer`` registered for ``quant_method: "hfquant"``.

    transformers builds it from the ``quantization_config`` of ``from_pretrained``: with a fresh
    ``HFQuantConfig`` it quantizes the loaded float model (``pre_quantized=False``: calibration, GPTQ/RTN/
    SmoothQuant, the report in ``model.hfquant_report``); with a saved hfquant checkpoint (or a GPTQ one, see
    ``hfquant.formats.load_gptq``) it builds quantized module skeletons before the weights load. It keeps its
    own copy of the config (the caller's is never modified); after loading that copy, with the resolved
    ``modules_to_not_convert`` and ``module_schemes``, is ``model.config.quantization_config``. The model's
    ``save_pretrained`` then writes ``quantization_config.save_format``. ``hfquant.quantize_`` drives the same
    quantizer on a model that is already loaded.
    """

    requires_calibration = False  # True would forbid quantizing at load (see transformers' base class)

    def __init__(self, quantization_config: HFQuantConfig, **kwargs):
        super().__init__(_own_copy(quantization_config), **kwargs)
        self.report: dict = {}
        self.run_options: dict = {}  # extra quantize_loaded_model_ arguments (hfquant.quantize_)

    def validate_environment(self, *args, device_map=None, **kwargs):
        if self.pre_quantized or not isinstance(device_map, dict):
            return
        devices = {str(d) for d in device_map.values()}
        if len(devices) > 1 and devices & {"cpu", "disk"}:
            raise ConfigError(
                f"hfquant: quantizing while offloading to {sorted(devices & {'cpu', 'disk'})} is not supported "
                f"(device_map has {sorted(devices)}); quantize on one device, save, then reload with the device_map"
            )

    def update_dtype(self, dtype):
        return dtype

    def _keep(self, name: str) -> bool:
        return self._predicate(name)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = modules_left_float(model, cfg.modules_to_not_convert, keep_in_fp32_modules)
        self._predicate = quantized_predicate(self.modules_to_not_convert)
        if not self.pre_quantized:
            return
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        if cfg.checkpoint_format != "hfquant":
            gptq_skeletons(model, cfg, dtype, kwargs.get("checkpoint_files"))
        else:
            hfquant_skeletons(model, cfg, self._keep, dtype, kwargs.get("checkpoint_files"))

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config  # the quantizer's own copy, now model.config.quantization_config
        install_save_format_hook(model)
        if self.pre_quantized:
            if cfg.checkpoint_format != "hfquant":
                convert_gptq_skeletons(model)
                # The config now describes an hfquant model: its Linears left float listed by name.
                cfg.checkpoint_format = "hfquant"
                cfg.modules_to_not_convert = sorted(n for n, m in model.named_modules() if n and is_quantizable(m))
            keep_internal_names(model)
            freeze_(model)
            return model

        t0, built = time.perf_counter(), build_seconds()
        self.report, module_schemes = quantize_loaded_model_(model, cfg, keep=self._keep, **self.run_options)
        # A first build of hfquant's CPU kernels (tens of seconds, once per environment) is not quantization.
        self.report["quantization_seconds"] = time.perf_counter() - t0 - (build_seconds() - built)
        if module_schemes is not None:
            cfg.module_schemes = module_schemes
        # Record the resolved skip list so a reload rebuilds exactly the same modules.
        kept = (set(self.modules_to_not_convert) | set(self.report.get("skipped", []))
                | set(self.report.get("routers", [])))
        if cfg.lm_head_bits is not None:
            kept.discard(output_head_name(model))
        cfg.modules_to_not_convert = sorted(kept)
        if "weights" in self.report:
            cfg.bits_per_weight = self.report["weights"]["bits_per_weight"]
        keep_internal_names(model)
        model.config.quantization_config = cfg
        model.hfquant_report = self.report
        freeze_(model)
        if build_seconds() > built:  # during quantization or in freeze_ (the kernels' operands)
            self.report["kernel_build_seconds"] = build_seconds() - built
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


_REGISTERED = False


def register() -> None:
    """Register ``HFQuantConfig`` and the quantizer with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HFQuantConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a reloaded module
        register_quantization_config(QUANT_METHOD)(HFQuantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HFQuantQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HFQuantQuantizer)
    _REGISTERED = True


_READY = True
register()
