"""``HFQuantConfig``: the quantization config transformers stores in ``config.json``, in sections.

Registered with transformers under ``quant_method: "hfquant"`` (see ``hfquant.integrations.transformers``).
It validates itself on construction, rejects unknown keys with the list of valid ones, round-trips
through ``to_dict``/``from_dict`` (flat, as every ``config.json`` so far), and keeps runtime-only objects
(in-memory datasets, tokenizer objects) out of ``config.json``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from hfquant.config import checks
from hfquant.config.constants import METHODS, QUALITY, QUANT_METHOD, reject
from hfquant.config.fields import field_table, FieldSpec, method_fields, section_classes
from hfquant.config.sections import (
    CalibrationArgs, GGUFArgs, GPTQArgs, MixedArgs, read_by, Section, SmoothQuantArgs, unchecked,
)
from hfquant.core.errors import ConfigError


@dataclasses.dataclass(init=False, repr=False, eq=False)
class HFQuantConfig(QuantizationConfigMixin):
    """Configuration of an hfquant quantization run, also stored with the quantized checkpoint.

    Build it from flat fields, ``HFQuantConfig(bits=3, gguf_type="Q4_K")`` (the names of ``config.json``), from
    sections, ``HFQuantConfig(gptq=GPTQArgs(bits=3), calibration={"num_samples": 8})`` (a section dataclass or a
    mapping of its fields), or both; a field given twice (flat and in its section) is refused. ``config.bits``
    reads and ``config.bits = 3`` writes the section field (``config.gptq.bits``).

    Args:
        method: ``"gptq"`` (calibrated, W4A16 and friends), ``"rtn"`` (round-to-nearest, no data) or
            ``"smoothquant"`` (W8A8).
        quality: ``"default"`` or ``"best"``: which accuracy methods a GPTQ/RTN run uses unless their own fields
            are given (``QUALITY``). ``"default"``: the Hessian-weighted grid search (``observer: hessian``);
            ``"best"`` adds asymmetric calibration (``gptaq: true``) and 16 steps of block reconstruction
            (``reconstruct_steps: 16``): 4.4x the time of plain GPTQ on SmolLM2 (W4 g128 asym, measured). With
            ``gguf_type`` the grids are GGUF's own, so ``quality`` sets only ``gptaq``. SmoothQuant takes only
            ``"default"``. BENCHMARKS.md shows what each costs and gains.
        gptq: the weight grid and GPTQ solver (``GPTQArgs``: bits, group_size, sym, desc_act, ..., lm_head_bits).
        calibration: the calibration text and windows (``CalibrationArgs``; flat ``dataset``, ``dataset_config``,
            ``dataset_split``, ``dataset_column``, ``num_samples``, ``seq_len``, ``seed``,
            ``calibration_batch_size``, ``tokenizer``).
        modules_to_not_convert: module names (or transformers skip patterns) to keep float; ``lm_head``
            and tied embeddings are kept float unless ``lm_head_bits`` is set.
        smoothquant: ``SmoothQuantArgs`` (alpha, weight_method, activation_scheme).
        save_format: layout ``save_pretrained`` writes: ``"hfquant"`` (reloads with ``import hfquant``),
            ``"gptq"`` (GPTQ v1 ``qweight``/``qzeros``/``scales``/``g_idx``, read by transformers+gptqmodel,
            vLLM, TGI), ``"compressed-tensors"`` (``pack-quantized`` W4A16, ``int-quantized`` W8A8), ``"gguf"``
            (with ``gguf_type``) or ``"onnx"`` (ONNX Runtime, weight-only: ``MatMulNBits``). See ``hfquant.formats``.
        checkpoint_format: layout of the pre-quantized weights being loaded: ``"hfquant"``, or ``"gptq"`` /
            ``"gptq_v2"`` when importing a GPTQ checkpoint (set by ``hfquant.formats.gptq_config``; it is
            reset to ``"hfquant"`` once the modules are converted).
        mixed: per-module schemes (``MixedArgs``: overrides, ``bits: "auto"``'s budget, module_schemes).
        gguf: llama.cpp GGUF grids (``GGUFArgs``; flat ``gguf_type``, ``gguf_head_type``, ``gguf_embedding_type``).
    """

    method: str = field(default="gptq", metadata=read_by())
    quality: str = field(default="default", metadata=read_by("gptq", "rtn"))
    gptq: GPTQArgs = field(default_factory=GPTQArgs)
    calibration: CalibrationArgs = field(default_factory=CalibrationArgs)
    modules_to_not_convert: list | None = field(default=None, metadata=read_by("gptq", "rtn", "smoothquant"))
    smoothquant: SmoothQuantArgs = field(default_factory=SmoothQuantArgs)
    # read by every method (smoothquant also saves as compressed-tensors from Python), a recipe key of gptq/rtn
    save_format: str = field(default="hfquant", metadata=read_by("gptq", "rtn", every_method=True))
    checkpoint_format: str = field(default="hfquant", metadata=read_by())
    mixed: MixedArgs = field(default_factory=MixedArgs)
    gguf: GGUFArgs = field(default_factory=GGUFArgs)

    def __init__(self, **kwargs):
        kwargs.pop("quant_method", None)
        values = _given_values(kwargs)
        object.__setattr__(self, "quant_method", QUANT_METHOD)
        for name, cls in SECTIONS.items():
            specs = [s for s in FIELDS if s.section == name]
            object.__setattr__(self, name, unchecked(
                cls, {s.name: copy.deepcopy(values.get(s.flat, s.default)) for s in specs},
                [s.name for s in specs if s.flat in values]))
        for spec in FIELDS:
            if spec.section is None:
                object.__setattr__(self, spec.name, copy.deepcopy(values.get(spec.flat, spec.default)))
        self._given = frozenset(values)
        self.post_init()

    # transformers calls cls(**dict) in from_dict; keep that behaviour and our validation. A saved config holds every
    # field (``to_dict``), also those its method does not read (at their defaults): they are dropped here, so a
    # checkpoint loads whatever they say, while a config built by hand refuses them (``_check_method_fields``).
    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        merged = {**config_dict, **kwargs}
        method = merged.get("method", DEFAULTS["method"])
        unread = _unread_fields(method) if method in METHOD_FIELDS else ()
        config = cls(**{k: v for k, v in merged.items() if k not in unread})
        return (config, {}) if return_unused_kwargs else config

    def post_init(self) -> None:
        """Validate every field; raise ``ConfigError`` naming the field, the value and what is accepted. Each section
        checks its own fields; ``checks`` holds the rules across sections."""
        if self.method not in METHODS:
            reject("method", self.method, f"one of {list(METHODS)}")
        checks.apply_quality(self)
        if self.gguf.type is not None:
            checks.apply_gguf_type(self)
        # The sections' own checks interleave with the rules across them so that a config with several problems
        # reports the one it always did (GPTQArgs.validate = check_grid + check_head, MixedArgs.validate =
        # check_patterns + check_budget + check_schemes).
        self.gptq.check_grid(gguf=self.gguf.type is not None)
        checks.check_weight_options(self)
        self.calibration.validate()
        self.smoothquant.validate()
        checks.check_formats(self)  # GGUFArgs.validate
        checks.check_lm_head(self)  # GPTQArgs.check_head
        self.mixed.check_patterns()
        checks.check_auto(self)
        self.mixed.check_budget()
        checks.check_overrides(self)
        self.mixed.check_schemes()
        self._check_method_fields()

    def _check_method_fields(self) -> None:
        """A field only other methods read (``METHOD_FIELDS``), given for this one, would be silently ignored."""
        for key in sorted(set(getattr(self, "_given", ())) & set(_unread_fields(self.method))):
            users = [m for m, fields in METHOD_FIELDS.items() if key in fields]
            raise ConfigError(f"HFQuantConfig.{key}: got {getattr(self, key)!r}, but method {self.method!r} does not "
                              f"use {key} (methods {users} do); remove it, or choose one of those methods")

    # The flat names of section fields (``config.bits``, ``config.gguf_type = ...``) forward to the section.
    def __getattr__(self, name: str):
        spec = _BY_FLAT.get(name)
        section = self.__dict__.get(spec.section) if spec is not None and spec.section else None
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(section, spec.name)

    def __setattr__(self, name: str, value) -> None:
        spec = _BY_FLAT.get(name)
        if spec is not None and spec.section is not None:
            setattr(getattr(self, spec.section), spec.name, value)
        else:
            object.__setattr__(self, name, value)

    def __copy__(self):
        """A shallow copy with sections of its own (setting ``copy.bits`` leaves the original alone)."""
        new = object.__new__(type(self))
        new.__dict__.update({k: copy.copy(v) if isinstance(v, Section) else v for k, v in self.__dict__.items()})
        return new

    def _flat_items(self):
        yield "quant_method", self.quant_method
        for spec in FIELDS:
            yield spec.flat, getattr(self, spec.flat)

    def to_dict(self) -> dict[str, Any]:
        """The flat fields (``config.json``); in-memory datasets and tokenizer objects become ``None``."""
        out = {}
        for key, value in self._flat_items():
            if key in OMITTED_AT_DEFAULT and value == DEFAULTS.get(key):
                continue  # newer fields: config.json files of runs that do not use them stay as they were
            if key in ("dataset", "tokenizer") and not isinstance(value, str):
                value = None
            if isinstance(value, tuple):
                value = list(value)
            out[key] = copy.deepcopy(value)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Fields that differ from the defaults (plus ``quant_method``)."""
        full = self.to_dict()
        return {k: v for k, v in full.items() if k == "quant_method" or v != DEFAULTS.get(k)}

    def __iter__(self):
        """``dict(config)``: the flat fields as held (runtime objects included)."""
        yield from copy.deepcopy(dict(self._flat_items())).items()

    def __eq__(self, other) -> bool:
        return isinstance(other, HFQuantConfig) and self.to_dict() == other.to_dict()

    # Unhashable on purpose: equality compares the fields, and the fields are mutable (a quantizer fills in
    # module_schemes, users set save_format), so a hash would change under a set or dict key that holds it.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_diff_dict().items() if k != "quant_method")
        return f"HFQuantConfig({fields})"


def _section_values(name: str, given) -> dict[str, Any]:
    """Section field -> value of what a section argument gives: a section dataclass (the fields it was given or
    holds off their defaults), a mapping of its fields, or None."""
    cls = SECTIONS[name]
    if given is None:
        return {}
    if isinstance(given, cls):
        return {f.name: getattr(given, f.name) for f in dataclasses.fields(cls)
                if f.name in given._given or getattr(given, f.name) != f.default}
    if isinstance(given, dict):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(names), key=str)
        if unknown:
            raise ConfigError(f"HFQuantConfig.{name}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        return dict(given)
    raise ConfigError(f"HFQuantConfig.{name}: got {given!r}; expected a {cls.__name__}, a mapping of its fields, "
                      "or null")


def _given_values(kwargs: dict) -> dict[str, Any]:
    """Flat name -> value of every field given, flat or in its section; unknown keys and a field given twice are
    refused."""
    unknown = sorted(set(kwargs) - set(DEFAULTS) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"HFQuantConfig: unknown key(s) {unknown}; valid keys are {sorted(DEFAULTS)}")
    values = {k: v for k, v in kwargs.items() if k not in SECTIONS}
    for name in (k for k in kwargs if k in SECTIONS):
        for key, value in _section_values(name, kwargs[name]).items():
            flat = SECTIONS[name].flat_name(key)
            if flat in values:
                raise ConfigError(f"HFQuantConfig.{flat}: given twice, as {flat} and as {name}.{key}; give it once")
            values[flat] = value
    return values


SECTIONS: dict[str, type[Section]] = section_classes(HFQuantConfig)
# The one field table (flat name, section, default, the methods that read it), in config.json's order.
FIELDS: tuple[FieldSpec, ...] = field_table(HFQuantConfig)
_BY_FLAT: dict[str, FieldSpec] = {s.flat: s for s in FIELDS}
# name -> default; the order is the order of to_dict().
DEFAULTS: dict[str, Any] = {s.flat: s.default for s in FIELDS}
# Fields added after checkpoints were first saved: left out of ``to_dict`` while at their defaults.
OMITTED_AT_DEFAULT = frozenset({"expert_tokens", "expert_min_tokens", "bits_per_weight"})
# The GGUF fields of the weight-only methods.
GGUF_FIELDS: tuple[str, ...] = tuple(s.flat for s in FIELDS if s.section == "gguf")
# The quantization fields each method reads. A field another method reads, given for this one, would be ignored, so
# it is refused (``HFQuantConfig.post_init``); the recipe schema's ``quantization`` keys are these lists.
METHOD_FIELDS: dict[str, tuple[str, ...]] = method_fields(FIELDS, METHODS)
# Read by every method, whatever the lists above say.
_SHARED_FIELDS: tuple[str, ...] = tuple(s.flat for s in FIELDS if s.every_method)


def _unread_fields(method: str) -> tuple[str, ...]:
    """The quantization fields other methods read and ``method`` does not."""
    every = {f for fields in METHOD_FIELDS.values() for f in fields}
    return tuple(sorted(every - set(METHOD_FIELDS[method]) - set(_SHARED_FIELDS)))


def resolve_method_fields(given: dict[str, Any], method: str) -> dict[str, Any]:
    """``method`` and the flat fields it reads (``METHOD_FIELDS`` order) as a run uses them: ``given``, else the
    default; a field that ``quality`` chooses, unless given, as the config resolves it (added last); ``bits``,
    ``group_size`` and ``sym`` left out when ``gguf_type`` sets them. What a recipe's ``quantization`` section
    resolves to. Raises ``ConfigError`` for an invalid combination."""
    chosen = {k for fields in QUALITY.values() for k in fields}
    out: dict[str, Any] = {"method": method}
    for key in METHOD_FIELDS[method]:
        if key not in given and (key in chosen or (given.get("gguf_type") and key in ("bits", "group_size", "sym"))):
            continue
        out[key] = copy.deepcopy(given.get(key, DEFAULTS[key]))
    config = HFQuantConfig(**out)
    for key in METHOD_FIELDS[method]:
        if key in chosen and key not in out:
            out[key] = copy.deepcopy(getattr(config, key))
    return out
