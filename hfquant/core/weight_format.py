"""Weight formats: how one quantized weight is stored, behind one interface.

A ``WeightFormat`` is a small frozen record (its settings: bits, group size, a GGUF block type, ...) whose class
says everything the rest of hfquant needs to know about that way of storing a weight:

* ``rtn(w, scale_dtype)``: round a float weight ``[rows, cols]`` to nearest, giving its *stored tensors*, a tuple
  named by ``fields`` (also the tensors the resume store saves per module, ``<module>:<field>``, and the ones
  several calibration processes broadcast);
* ``solver_grids(w, perm, static, hinv, scale_dtype, h_diag)``: the grid policy GPTQ's column loop quantizes on
  (``hfquant.core.gptq``): a grid per group, fitted up front or when a group starts, the codes picked on it, and
  ``stored(codes, g_idx)`` once every column is done;
* ``dequantize(stored, cols)``: the float32 weight the stored tensors hold; ``empty(rows, cols, device)``: buffers
  of the stored tensors' shapes (to receive a broadcast); ``join_rows(parts)``: one weight from row slabs;
* ``to_dict(method)`` / ``from_fields(fields)``: its entry in ``config.json``'s ``module_schemes`` and the
  override keys (``keys``) that select it; ``exports``: the ``save_format`` values that can write it;
  ``reconstructable``: whether block reconstruction (``hfquant.quantize.reconstruct``) can tune it (its stored
  tensors are then ``IntGrid``'s);
* for a format the config selects for a whole run (``from_config``, e.g. GGUF's ``gguf_type``): ``assign`` (each
  module's own variant), ``module_error`` (a module it cannot hold, checked before loading), ``finish_model_`` (a
  model-level step after quantization) and ``load_extras_`` (what a reload's skeleton needs besides the modules).

The ``nn`` module that holds a format is looked up by the format's ``kind`` (``hfquant.nn.stored``); a format
with no module of its own is held by the generic ``QuantLinearStored``. Formats register with ``register_format``;
``format_from_fields`` builds one from an override / ``module_schemes`` entry. ``Scheme`` (a format and the method
that fills it) is the one per-module scheme record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hfquant.core.errors import ConfigError


class WeightFormat:
    """Base of the weight formats (subclasses are frozen dataclasses). See the module docstring."""

    kind: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    keys: ClassVar[tuple[str, ...]]
    exports: ClassVar[tuple[str, ...]] = ("hfquant",)
    reconstructable: ClassVar[bool] = False

    # ---- what it is
    @property
    def bits(self) -> int:
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        raise NotImplementedError

    @property
    def sym(self) -> bool:
        return True

    @classmethod
    def check_field(cls, key: str, value: Any) -> str | None:
        """``None`` when ``value`` is valid for the override key ``key`` (one of ``keys``), else what is expected."""
        raise NotImplementedError

    @classmethod
    def entry_ok(cls, entry: dict) -> bool:
        """Whether a ``module_schemes`` entry this format claims holds valid values of its keys."""
        return all(cls.check_field(k, entry[k]) is None for k in cls.keys if k in entry)

    @classmethod
    def from_fields(cls, fields: dict, observer: str = "minmax") -> WeightFormat | None:
        """The format an override / ``module_schemes`` entry describes, or ``None`` when it names another format."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config) -> WeightFormat | None:
        """The run's own format from an ``HFQuantConfig`` when the config selects this format, else ``None``."""
        return None

    def to_dict(self, method: str) -> dict:
        """The module's ``module_schemes`` entry (``config.json``), ``method`` included."""
        raise NotImplementedError

    def columns_error(self, cols: int) -> str | None:
        """Why a weight with rows of ``cols`` values cannot take this format (``None``: it can)."""
        return None

    def stored_bits(self, in_features: int, out_features: int, scale_bits: int = 32) -> int:
        """Bits a checkpoint stores for one weight of this shape (bias excluded)."""
        raise NotImplementedError

    # ---- the math
    def rtn(self, w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def solver_grids(self, w: torch.Tensor, perm: torch.Tensor | None, static: bool, hinv: torch.Tensor,
                     scale_dtype: torch.dtype | None, h_diag: torch.Tensor | None = None):
        raise NotImplementedError

    def dequantize(self, stored: tuple[torch.Tensor, ...], cols: int) -> torch.Tensor:
        raise NotImplementedError

    def empty(self, rows: int, cols: int, device) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def join_rows(self, parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """One weight's stored tensors from those of its consecutive row slabs (default: every field by rows)."""
        return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))

    def split_rows(self, stored: tuple[torch.Tensor, ...], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """Rows ``r0:r1`` of a weight's stored tensors, the inverse of ``join_rows`` (default: every field by rows)."""
        return tuple(t[r0:r1] for t in stored)

    # ---- hooks of a format the config selects for the whole run (``from_config``)
    def assign(self, config, cols: dict[str, int], schemes: dict, skipped: list[str]) -> tuple[dict, list[str]]:
        """Each module's own scheme under this run format, given the resolved ``schemes`` and every module's row
        length ``cols``; modules the format cannot hold move to ``skipped`` (kept float). Default: unchanged."""
        return schemes, skipped

    def module_error(self, name: str, module) -> str | None:
        """Why ``module`` (a quantizable module, checked on the meta skeleton before loading) cannot take this
        format; ``None``: it can."""
        return None

    def finish_model_(self, model, config) -> dict | None:
        """A model-level step after the modules are quantized (e.g. GGUF's head and embeddings); its report entry
        (``report[kind]``), or ``None`` when there is none."""
        return None

    def load_extras_(self, model, config, keys: set[str]) -> None:
        """Reloading a checkpoint of this run format: what else the skeleton needs before the tensors ``keys`` load
        (e.g. GGUF's held head blocks). Default: nothing."""

    def describe(self) -> str:
        """What a module of this format holds, for messages (e.g. ``4-bit codes, group_size 128``)."""
        return f"{self.kind} weights ({', '.join(self.fields)})"


_FORMATS: list[type[WeightFormat]] = []
MODULE_METHODS = ("gptq", "rtn")  # how a module's weight is filled: GPTQ's solve or rounding to nearest
_ENTRY_KEYS = ("bits", "group_size", "sym", "method")  # every module_schemes entry has these


def register_format(cls: type[WeightFormat]) -> type[WeightFormat]:
    """Class decorator: make ``cls`` known to ``format_from_fields`` and the override keys (a later registration
    is asked first, so a new format may claim keys before the built-in integer grid, which takes any entry)."""
    if any(c.kind == cls.kind and c is not cls for c in _FORMATS):
        raise ValueError(f"weight format kind {cls.kind!r} is registered twice")
    if cls not in _FORMATS:
        _FORMATS.append(cls)
    return cls


def registered_formats() -> tuple[type[WeightFormat], ...]:
    """The registered format classes, most recently registered first."""
    return tuple(reversed(_FORMATS))


def override_keys() -> tuple[str, ...]:
    """Every key a registered format reads from an override or ``module_schemes`` entry, in registration order."""
    seen: dict[str, None] = {}
    for cls in _FORMATS:
        seen.update(dict.fromkeys(cls.keys))
    return tuple(seen)


def check_format_field(key: str, value: Any) -> str | None:
    """What the format that reads ``key`` expects of ``value`` (``None``: valid)."""
    for cls in registered_formats():
        if key in cls.keys:
            return cls.check_field(key, value)
    return f"a key of {list(override_keys())}"


def unregister_format(cls: type[WeightFormat]) -> None:
    """Forget a registered format (tests that add one for a while)."""
    if cls in _FORMATS:
        _FORMATS.remove(cls)


def scheme_entry_ok(entry) -> bool:
    """Whether ``entry`` is a valid ``module_schemes`` entry: ``bits``, ``group_size``, ``sym``, ``method`` and the
    keys of the format that claims it, each valid."""
    if not isinstance(entry, dict) or entry.get("method") not in MODULE_METHODS:
        return False
    if not set(_ENTRY_KEYS) <= set(entry) <= {*override_keys(), "method"}:
        return False
    if not (_is_int(entry["bits"]) and _is_int(entry["group_size"]) and isinstance(entry["sym"], bool)):
        return False
    cls = next(c for c in registered_formats() if c.from_fields(entry) is not None)
    return cls.entry_ok(entry)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def format_from_fields(fields: dict, observer: str = "minmax") -> WeightFormat:
    """The format an override / ``module_schemes`` entry describes (the first registered format that claims it)."""
    for cls in registered_formats():
        fmt = cls.from_fields(fields, observer)
        if fmt is not None:
            return fmt
    raise ConfigError(f"module scheme {fields!r} describes no known weight format")


def format_from_config(config) -> WeightFormat | None:
    """The run's format when a registered format is selected by the config itself (e.g. its GGUF section)."""
    for cls in registered_formats():
        fmt = cls.from_config(config)
        if fmt is not None:
            return fmt
    return None


@dataclass(frozen=True)
class Scheme:
    """The scheme one module is quantized with: its weight format and the method that fills it."""

    format: WeightFormat
    method: str = "gptq"  # "gptq" or "rtn"

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self) -> int:
        return self.format.group_size

    @property
    def sym(self) -> bool:
        return self.format.sym

    def to_dict(self) -> dict:
        return self.format.to_dict(self.method)

    def fields(self) -> dict:
        """The override fields of this scheme (what ``resolve`` starts from for every module)."""
        return {**self.to_dict(), "skip": False}

    @classmethod
    def from_fields(cls, fields: dict, observer: str = "minmax") -> Scheme:
        return cls(format_from_fields(fields, observer), fields.get("method", "gptq"))
