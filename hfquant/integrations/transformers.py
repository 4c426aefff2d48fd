"""The transformers quantizer for ``quant_method: "hfquant"``.

Fresh quantization runs in ``_process_model_after_weight_loading`` (calibration needs the loaded float
model, like transformers' own GPTQ integration). Reloading a saved checkpoint swaps the Linears for
``QuantLinearWeightOnly`` skeletons before the weights load, so the saved tensors load by name.

The quantizer works on its own copy of the config it is given (``HFQuantQuantizer.__init__``): the resolved
skip list and per-module schemes go into that copy, which transformers' ``postprocess_model`` makes
``model.config.quantization_config`` (so ``config.json`` records them); the caller's object is never written.
"""

from __future__ import annotations

import copy
import copyreg
import logging
import os
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

from hfquant.calibration.graph import in_out_features, is_quantizable, output_head_name, set_submodule
from hfquant.calibration.onload import empty_model, LayerLoader, local_folder
from hfquant.config import HFQuantConfig, QUANT_METHOD
from hfquant.core.errors import ConfigError
from hfquant.core.gguf_blocks import BLOCK_TYPES
from hfquant.formats.export import save_pretrained_as
from hfquant.formats.gptq import checkpoint_keys, GPTQImportLinear
from hfquant.kernels import half as half_kernels
from hfquant.kernels.jit_build import build_seconds
from hfquant.mixed import gguf_types
from hfquant.nn import prepare_model
from hfquant.nn.half import HalfStoredLinear
from hfquant.nn.gguf import QuantLinearGGUF
from hfquant.nn.w8a8 import QuantLinearW8A8
from hfquant.nn.weight_only import QuantLinearWeightOnly
from hfquant.quantize.entry import quantize_loaded_model_

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
        head = output_head_name(model) if cfg.lm_head_bits is not None else None
        if not self.pre_quantized:
            return
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        if cfg.checkpoint_format != "hfquant":
            self._gptq_skeletons(model, cfg, dtype, kwargs.get("checkpoint_files"))
            return
        per_module = cfg.module_schemes or {}
        for name, module in list(model.named_modules()):
            if not name or not is_quantizable(module) or not (self._keep(name) or name == head):
                continue
            in_f, out_f = in_out_features(module)
            bias = getattr(module, "bias", None) is not None
            if name == head:  # saved with lm_head_bits: an 8-bit per-channel head, whatever the skip list says
                s = {"bits": cfg.lm_head_bits, "group_size": -1}
            else:
                s = per_module.get(name) or {"bits": cfg.bits, "group_size": cfg.group_size}
            if s["bits"] == "auto":
                raise ConfigError(f"hfquant: {name} has no entry in quantization_config.module_schemes of this "
                                  "bits='auto' checkpoint; the config.json is incomplete, re-save the model")
            with torch.device("meta"):
                if cfg.method == "smoothquant":
                    q = QuantLinearW8A8(in_f, out_f, bias=bias, dtype=dtype)
                elif s.get("gguf_type"):
                    q = QuantLinearGGUF(in_f, out_f, s["gguf_type"], bias=bias, dtype=dtype)
                else:
                    q = QuantLinearWeightOnly(in_f, out_f, s["bits"], s["group_size"], bias=bias, dtype=dtype)
            set_submodule(model, name, q)
        if cfg.gguf_type is not None:
            _held_block_skeletons(model, cfg, checkpoint_keys(kwargs.get("checkpoint_files")))

    def _gptq_skeletons(self, model, cfg, dtype, checkpoint_files) -> None:
        """Importing a GPTQ checkpoint: give each module that has a ``qweight`` in the files a skeleton
        holding the GPTQ tensors; ``_process_model_after_weight_loading`` converts them."""
        keys = checkpoint_keys(checkpoint_files)
        names = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
        if not names:
            raise ConfigError(f"hfquant: checkpoint_format={cfg.checkpoint_format!r} but no '*.qweight' tensor in the "
                              "checkpoint's safetensors files; is it a GPTQ checkpoint (safetensors only)?")
        tied = {k.rsplit(".", 1)[0] for k in getattr(model, "all_tied_weights_keys", {}) or {}}
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"hfquant: checkpoint has {name}.qweight but the model has no module {name!r}") from None
            if not is_quantizable(module) or name in tied:
                raise ConfigError(f"hfquant: {name} is quantized in the GPTQ checkpoint but is not an untied Linear here")
            in_f, out_f = in_out_features(module)
            with torch.device("meta"):
                q = GPTQImportLinear(in_f, out_f, cfg.bits, cfg.group_size, cfg.checkpoint_format,
                                     f"{name}.g_idx" in keys, f"{name}.bias" in keys, dtype, name=name)
            set_submodule(model, name, q)

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config  # the quantizer's own copy, now model.config.quantization_config
        _install_save_format_hook(model)
        if self.pre_quantized:
            if cfg.checkpoint_format != "hfquant":
                _convert_gptq_skeletons(model)
                # The config now describes an hfquant model: its Linears left float listed by name.
                cfg.checkpoint_format = "hfquant"
                cfg.modules_to_not_convert = sorted(n for n, m in model.named_modules() if n and is_quantizable(m))
            _freeze(model)
            return model

        t0, built = time.perf_counter(), build_seconds()
        self.report, module_schemes = quantize_loaded_model_(model, cfg, keep=self._keep, **self.run_options)
        # A first build of hfquant's CPU kernels (tens of seconds, once per environment) is not quantization.
        self.report["quantization_seconds"] = time.perf_counter() - t0 - (build_seconds() - built)
        if module_schemes is not None:
            cfg.module_schemes = module_schemes
        # Record the resolved skip list so a reload rebuilds exactly the same modules.
        kept = set(self.modules_to_not_convert) | set(self.report.get("skipped", []))
        if cfg.lm_head_bits is not None:
            kept.discard(output_head_name(model))
        cfg.modules_to_not_convert = sorted(kept)
        model.config.quantization_config = cfg
        model.hfquant_report = self.report
        _freeze(model)
        if build_seconds() > built:  # during quantization or in _freeze (the kernels' operands)
            self.report["kernel_build_seconds"] = build_seconds() - built
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _held_block_skeletons(model, cfg, keys: set[str]) -> None:
    """A ``gguf_type`` checkpoint: the output head's and token embeddings' GGUF blocks (``gguf_types.HELD_BLOCKS``,
    kept by ``round_gguf_embeddings_`` for the GGUF writer) get a buffer to load into, of the shape their type
    gives, where the checkpoint has them (checkpoints saved before hfquant kept them do not)."""
    for name, kind in gguf_types.embedding_modules(model, cfg).items():
        bt = BLOCK_TYPES.get(kind)
        if bt is None or f"{name}.{gguf_types.HELD_BLOCKS}" not in keys:
            continue
        module = model.get_submodule(name)
        rows, cols = module.weight.shape
        module.register_buffer(gguf_types.HELD_BLOCKS, torch.empty(rows, cols // bt.block_values * bt.block_bytes,
                                                                   dtype=torch.uint8, device="meta"))


def _convert_gptq_skeletons(model) -> None:
    """Replace the GPTQ skeletons by ``QuantLinearWeightOnly`` modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GPTQImportLinear):
            set_submodule(model, name, module.to_w4a16())


class _SaveFormat:
    """Mixed into the class of every model the quantizer produced (see ``_install_save_format_hook``):
    ``save_pretrained`` writes ``quantization_config.save_format``, whether it is called as
    ``model.save_pretrained(d)`` or ``type(model).save_pretrained(model, d)``."""

    _hfquant_base: type  # the model's original class, set on each subclass

    def save_pretrained(self, save_directory, **kwargs):
        """``save_pretrained`` of the model's class for ``save_format: hfquant`` (the default); for ``"gptq"``
        and ``"compressed-tensors"`` the hfquant layout is written to a temporary folder and converted
        (``hfquant.formats.export.save_pretrained_as``)."""
        fmt = getattr(getattr(self.config, "quantization_config", None), "save_format", "hfquant")
        if fmt == "hfquant":
            return super().save_pretrained(save_directory, **kwargs)
        tokenizer_dir = getattr(self, "name_or_path", None) if fmt == "gguf" else None
        return save_pretrained_as(super().save_pretrained, save_directory, fmt, tokenizer_dir=tokenizer_dir, **kwargs)

    def __reduce_ex__(self, protocol):
        # pickle finds classes by module and name, which lead to the original class: rebuild the subclass from it
        rv = super().__reduce_ex__(protocol)
        if isinstance(rv, tuple) and rv[0] is copyreg.__newobj__ and rv[1][0] is type(self):
            return (_new_with_save_format, (self._hfquant_base, *rv[1][1:]), *rv[2:])
        return rv


_SAVE_FORMAT_CLASSES: dict[type, type] = {}


def _save_format_class(base: type) -> type:
    """``base`` with ``_SaveFormat`` mixed in, made once per class. It has ``base``'s ``__name__``,
    ``__qualname__`` and ``__module__``, so ``config.json``'s ``architectures`` (the class name) and everything
    transformers derives from the class (remote code, ``can_generate``) stay as they are."""
    cls = _SAVE_FORMAT_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_SaveFormat, base), {
            "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
            "_hfquant_base": base})
        _SAVE_FORMAT_CLASSES[base] = cls
    return cls


def _new_with_save_format(base: type, *args):
    """An empty instance of ``base``'s save-format subclass (pickle and ``copy.deepcopy`` fill in its state)."""
    cls = _save_format_class(base)
    return cls.__new__(cls, *args)


def _install_save_format_hook(model) -> None:
    """Make ``save_pretrained`` honour ``quantization_config.save_format``. The model's class is swapped for a
    subclass (``_save_format_class``) rather than patching the instance, so that a call through the class,
    ``type(model).save_pretrained(model, d)``, honours it too; ``copy.deepcopy(model)`` keeps the class.
    transformers' ``save_pretrained`` offers no hook for this: a quantizer can only change the state dict
    (``get_state_dict_and_metadata``), while the GPTQ and compressed-tensors layouts also change
    ``config.json`` and add files."""
    if getattr(type(model), "_hfquant_base", None) is None:  # not yet (also across a reload of this module)
        model.__class__ = _save_format_class(type(model))


def _freeze(model) -> None:
    """Freeze the quantized tensors and convert them to their kernels' layouts once, at load time; store a float
    output head in 16 bits where that is exact (``_store_head_in_16_bits``)."""
    for m in model.modules():
        if isinstance(m, (QuantLinearWeightOnly, QuantLinearW8A8)):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    prepare_model(model)
    _store_head_in_16_bits(model)


def _store_head_in_16_bits(model) -> None:
    """Replace a float32 output head on the CPU by ``HalfStoredLinear`` when every weight is exactly bfloat16 (or
    float16), as in a float32 model loaded from a 16-bit checkpoint: the same values in half the bytes, and with
    hfquant's 16-bit GEMV, decode reads half as much for the head. Not for tied heads (declared in the config, or the
    tensor shared with another parameter), other devices and dtypes, a CPU without the kernel, or with
    ``HFQUANT_HEAD_16BIT=0``."""
    if os.environ.get("HFQUANT_HEAD_16BIT", "1") == "0":
        return
    name = output_head_name(model)
    head = model.get_submodule(name) if name else None
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or head.weight.dtype is not torch.float32:
        return
    if hasattr(head, gguf_types.HELD_BLOCKS):  # its GGUF blocks stay with it, for the GGUF writer
        return
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shared = any(p.data_ptr() == head.weight.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)
                 if not n.startswith(f"{name}."))
    if getattr(text_config, "tie_word_embeddings", False) or shared or not half_kernels.cpu_gemv_available():
        return
    half = HalfStoredLinear.from_linear(head)
    if half is not None:
        set_submodule(model, name, half)
        logger.info("hfquant: %s stored in %s (its float32 values are exactly 16-bit; decode reads half the bytes)",
                    name, half.weight.dtype)


_QUANTIZED_MODULES = (QuantLinearWeightOnly, QuantLinearW8A8, QuantLinearGGUF, GPTQImportLinear)


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
                       offload_folder=None, revision=None, trust_remote_code: bool = False, **options):
    """Load and quantize a model a decoder layer at a time, never holding all its float weights.

    ``model`` is a local folder (or Hub id) with safetensors weights. Returns the quantized model, the same
    module for module and bit for bit as ``from_pretrained(model, dtype=dtype)`` followed by
    ``quantize_(model, config)``, ready for ``save_pretrained``. ``activations`` says where the
    calibration hidden states live between blocks: ``"device"`` (the execution device), ``"cpu"`` or
    ``"disk"`` (safetensors files in a temporary folder under ``offload_folder``; quantized modules are then
    recomputed rather than having their outputs cached). ``config`` is not modified (the resolved config is
    the returned model's ``config.quantization_config``). ``options`` go to ``quantize_loaded_model_``
    (``windows``, ``progress``, ``dist``).
    """
    folder = local_folder(str(model), revision)
    skeleton = empty_model(folder, dtype, revision=revision, trust_remote_code=trust_remote_code)
    loader = LayerLoader(skeleton, folder, device, dtype)
    loader.load_outside()
    report = quantize_(skeleton, config, onload=loader, activations=activations, offload_folder=offload_folder,
                       **options)
    report["layerwise"] = {"activations": activations, "read_seconds": loader.seconds}
    return skeleton


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
