"""The rules of ``HFQuantConfig`` that span sections (each section checks its own fields): what ``quality`` and
``gguf_type`` fill in, which options need which method, formats, and ``bits: "auto"`` with overrides.
``HFQuantConfig.post_init`` calls them in order; each raises the one-line ``ConfigError`` naming the flat field."""

from __future__ import annotations

from hfquant.config.constants import (
    AUTO, CHECKPOINT_FORMATS, QUALITY, reject, SAVE_FORMATS, WEIGHT_METHODS,
)
from hfquant.core.errors import ConfigError
from hfquant.core.gguf_blocks import BLOCK_TYPES
from hfquant.core.gguf_grids import symmetric
from hfquant.core.gguf_types import base_type


def _bad(cfg, field: str, expected: str):
    reject(field, getattr(cfg, field), expected)


def apply_quality(cfg) -> None:
    """Set the fields ``quality`` chooses that were not given (``QUALITY``), where they apply to the method."""
    if cfg.quality not in QUALITY:
        _bad(cfg, "quality", f"one of {list(QUALITY)}")
    if cfg.method == "smoothquant":
        if cfg.quality != "default":
            _bad(cfg, "quality", '"default" for method smoothquant (the quality settings are weight-only GPTQ/RTN '
                                 "methods; SmoothQuant's own are alpha and weight_method)")
        return
    for key, value in QUALITY[cfg.quality].items():
        if key in cfg._given or (key in ("gptaq", "reconstruct_steps") and cfg.method != "gptq"):
            continue
        if key == "reconstruct_steps" and cfg.gguf.type is not None:
            continue  # GGUF blocks keep llama.cpp's fitted grids
        setattr(cfg.gptq, key, value)
    if cfg.gguf.type is not None and "observer" not in cfg._given:
        cfg.gptq.observer = "minmax"  # GGUF grids are fitted as llama.cpp fits them


def apply_gguf_type(cfg) -> None:
    """Check ``gguf_type`` against the fields it fixes, then set them from the type."""
    cfg.gguf.check_type()
    bt = BLOCK_TYPES[base_type(cfg.gguf.type)]
    fixed = {"bits": bt.bits, "group_size": bt.group_size, "sym": symmetric(bt.name)}
    for key, value in fixed.items():
        if key in cfg._given and getattr(cfg.gptq, key) != value:
            raise ConfigError(f"HFQuantConfig.{key}: got {getattr(cfg.gptq, key)!r}, but gguf_type {cfg.gguf.type!r} "
                              f"stores {key} {value!r}; drop {key} (gguf_type sets it) or choose another gguf_type")
        setattr(cfg.gptq, key, value)
    if cfg.method not in WEIGHT_METHODS:
        _bad(cfg, "method", f"gptq or rtn with gguf_type (GGUF files hold weight-only grids); got {cfg.method!r}")
    if cfg.gptq.desc_act and not cfg.gptq.static_groups:
        _bad(cfg, "static_groups", "true with gguf_type and desc_act (a GGUF block holds consecutive columns, so "
                                   "act-order needs static groups), or set desc_act false")
    if cfg.gptq.lm_head_bits is not None:
        _bad(cfg, "lm_head_bits", "null with gguf_type (the GGUF head type is gguf_head_type)")
    if cfg.gptq.observer != "minmax":
        _bad(cfg, "observer", "minmax with gguf_type (GGUF grids are fitted as llama.cpp fits them)")
    for pattern, fields in (cfg.mixed.overrides or {}).items():
        if set(fields) - {"skip", "method", "gguf_type"}:
            raise ConfigError(f"HFQuantConfig.overrides[{pattern!r}]: with gguf_type only skip, method and gguf_type "
                              f"can be overridden, got {sorted(set(fields) - {'skip', 'method', 'gguf_type'})}")


def check_weight_options(cfg) -> None:
    """Asymmetric calibration and block reconstruction are GPTQ options, and not with GGUF grids."""
    if cfg.gptq.gptaq and cfg.method != "gptq":
        _bad(cfg, "gptaq", f"false for method {cfg.method!r} (asymmetric calibration is a GPTQ option)")
    if cfg.gptq.reconstruct_steps and cfg.method != "gptq":
        _bad(cfg, "reconstruct_steps", f"0 for method {cfg.method!r} (block reconstruction follows GPTQ's solves)")
    if cfg.gptq.reconstruct_steps and cfg.gguf.type is not None:
        _bad(cfg, "reconstruct_steps", "0 with gguf_type (GGUF blocks keep llama.cpp's fitted grids)")


def check_formats(cfg) -> None:
    """``save_format``, the GGUF tensor types, ``checkpoint_format`` and ``modules_to_not_convert``."""
    if cfg.save_format not in SAVE_FORMATS:
        _bad(cfg, "save_format", f"one of {list(SAVE_FORMATS)}")
    if cfg.save_format == "gguf" and cfg.gguf.type is None:
        _bad(cfg, "save_format", "gguf only with gguf_type set (e.g. gguf_type: Q4_K_M), or another save_format")
    if cfg.save_format == "onnx" and cfg.gguf.type is not None:
        _bad(cfg, "save_format", "onnx only without gguf_type (ONNX Runtime does not read GGUF grids); use save_format "
                                 "gguf, or bits / group_size for ONNX")
    cfg.gguf.validate()
    if cfg.checkpoint_format not in CHECKPOINT_FORMATS:
        _bad(cfg, "checkpoint_format", f"one of {list(CHECKPOINT_FORMATS)}")
    m = cfg.modules_to_not_convert
    if m is not None and (not isinstance(m, (list, tuple)) or not all(isinstance(x, str) for x in m)):
        _bad(cfg, "modules_to_not_convert", "a list of module names")


def check_lm_head(cfg) -> None:
    """An 8-bit head needs a weight-only method with fixed bits, saved as hfquant."""
    cfg.gptq.check_head()
    if cfg.gptq.lm_head_bits is None:
        return
    if cfg.method == "smoothquant" or cfg.gptq.bits == AUTO:
        _bad(cfg, "lm_head_bits", f"null for method {cfg.method!r} with bits {cfg.gptq.bits!r}; an 8-bit head needs "
                                  "method gptq or rtn with fixed bits")
    if cfg.save_format != "hfquant":
        _bad(cfg, "lm_head_bits", f"null with save_format {cfg.save_format!r} (GPTQ and compressed-tensors "
                                  "checkpoints are written with a float head); use save_format hfquant")


def check_auto(cfg) -> None:
    """``bits: "auto"``: GPTQ only, with exactly one budget; the budget fields need it."""
    auto = cfg.gptq.bits == AUTO
    if auto and cfg.method != "gptq":
        _bad(cfg, "bits", f'an integer for method {cfg.method!r}; "auto" needs method "gptq"')
    for field in ("target_avg_bits", "max_ppl_increase", "candidates"):
        if getattr(cfg.mixed, field) is not None and not auto:
            _bad(cfg, field, 'null unless bits is "auto"')
    if auto and (cfg.mixed.target_avg_bits is None) == (cfg.mixed.max_ppl_increase is None):
        _bad(cfg, "bits", '"auto" with exactly one of target_avg_bits (e.g. 3.5) or max_ppl_increase (e.g. 0.05)')
    if auto and cfg.gguf.type is not None:
        _bad(cfg, "bits", 'an integer with gguf_type ("auto" does not choose GGUF types; Q4_K_M is llama.cpp\'s mix)')


def check_overrides(cfg) -> None:
    """What overrides may set, given the method, ``bits`` and ``gguf_type``."""
    overrides = cfg.mixed.overrides
    if not overrides:
        return
    if cfg.gguf.type is None and any("gguf_type" in f for f in overrides.values()):
        raise ConfigError("HFQuantConfig.overrides: gguf_type overrides need the run's gguf_type set (e.g. gguf_type: Q4_K)")
    if cfg.method == "smoothquant" or cfg.gptq.bits == AUTO:
        for pattern, fields in overrides.items():
            if set(fields) - {"skip"}:
                what = "SmoothQuant" if cfg.method == "smoothquant" else 'bits "auto"'
                raise ConfigError(f"HFQuantConfig.overrides[{pattern!r}]: {what} supports only skip overrides, "
                                  f"got {sorted(set(fields) - {'skip'})}; remove them or use method gptq/rtn with fixed bits")
    if cfg.method == "rtn":
        for pattern, fields in overrides.items():
            if fields.get("method") == "gptq":
                raise ConfigError(f"HFQuantConfig.overrides[{pattern!r}].method: gptq needs calibration data; "
                                  "use method gptq for the run (modules can then be rtn per override)")
