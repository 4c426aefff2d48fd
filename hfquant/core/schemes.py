"""Per-module weight schemes: override patterns, their precedence, and the resolved per-module map.

An override maps a *pattern* over full module names (``model.layers.3.mlp.down_proj``) to some of the
fields ``bits``, ``group_size``, ``method``, ``sym`` and ``skip``:

* ``re:<regex>``: the regex must match the whole name (``re.fullmatch``);
* a pattern with ``*``, ``?`` or ``[`` is a glob (``fnmatch.fnmatchcase``; ``*`` also matches dots);
* anything else is an exact module name.

Precedence (``specificity``): exact name > glob > regex; between two globs (or two regexes) the one with
more literal characters (characters that are not wildcards / regex operators) is more specific; a
remaining tie goes to the pattern listed later. Patterns are applied field by field from the least to the
most specific, so each field of a module comes from the most specific pattern that sets it, and the
top-level config gives the fields no pattern sets. Two matching patterns that set one field to different
values are a *conflict*: resolved by the rule above and reported (log and ``report.json``).
"""

from __future__ import annotations

import fnmatch
import re

from hfquant.core.errors import ConfigError
from hfquant.core.int_grid import IntGrid
from hfquant.core.weight_format import check_format_field, MODULE_METHODS, override_keys, Scheme

_GLOB_CHARS = set("*?[")
_REGEX_META = set(".^$*+?{}[]\\|()")


def override_fields() -> tuple[str, ...]:
    """The keys an override may set: the integer grid's, ``method``, ``skip``, then the other registered weight
    formats' keys (``hfquant.core.weight_format``)."""
    bits, group_size, sym = IntGrid.keys
    return (bits, group_size, "method", sym, "skip", *(k for k in override_keys() if k not in IntGrid.keys))


def pattern_kind(pattern: str) -> str:
    if pattern.startswith("re:"):
        return "regex"
    return "glob" if _GLOB_CHARS & set(pattern) else "exact"


def specificity(pattern: str, position: int) -> tuple[int, int, int]:
    """Sort key, larger = more specific: (kind rank, literal characters, position in the mapping)."""
    kind = pattern_kind(pattern)
    if kind == "exact":
        return (2, len(pattern), position)
    if kind == "glob":
        return (1, sum(c not in _GLOB_CHARS for c in pattern), position)
    return (0, sum(c not in _REGEX_META for c in pattern[3:]), position)


def matches(pattern: str, name: str) -> bool:
    kind = pattern_kind(pattern)
    if kind == "regex":
        return re.fullmatch(pattern[3:], name) is not None
    if kind == "glob":
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern


def validate_overrides(overrides, where: str = "HFQuantConfig.overrides") -> None:
    """Raise ``ConfigError`` (naming the key path) unless ``overrides`` is a valid pattern -> fields mapping."""
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: got {type(overrides).__name__}; expected a mapping pattern -> "
                          "{bits, group_size, method, sym, skip}, e.g. {'re:.*down_proj': {'bits': 8}}")
    for pattern, fields in overrides.items():
        path = f"{where}[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern.strip() or pattern == "re:":
            raise ConfigError(f"{path}: a pattern must be a non-empty module name, glob or 're:<regex>'")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConfigError(f"{path}: invalid regex ({exc}); fix the pattern after 're:'") from None
        if not isinstance(fields, dict) or not fields:
            raise ConfigError(f"{path}: got {fields!r}; expected a non-empty mapping with some of {list(override_fields())}")
        for key, value in fields.items():
            _check_override_field(path, key, value)


def _check_override_field(path: str, key: str, value) -> None:
    valid = override_fields()
    if key not in valid:
        raise ConfigError(f"{path}.{key}: unknown key; valid keys are {list(valid)}")
    if key in ("method", "skip"):
        expected = None if (value in MODULE_METHODS if key == "method" else isinstance(value, bool)) else (
            f"one of {list(MODULE_METHODS)}" if key == "method" else "true or false")
    else:
        expected = check_format_field(key, value)
    if expected is not None:
        raise ConfigError(f"{path}.{key}: got {value!r}; expected {expected}")


def resolve(overrides: dict | None, names: list[str], default: Scheme, observer: str = "minmax",
            where: str = "quantization.overrides") -> tuple[dict[str, Scheme], list[str], list[dict]]:
    """Resolve ``overrides`` over the quantizable module ``names``.

    Returns ``(schemes, skipped, conflicts)``: the scheme of every module that is quantized, the names kept
    float (``skip: true``), and one record per conflict (module, field, the winning pattern and value, the
    losing ones). Raises ``ConfigError`` for a pattern that matches none of ``names``.
    """
    overrides = overrides or {}
    ordered = sorted(enumerate(overrides.items()), key=lambda x: specificity(x[1][0], x[0]))
    for pattern in overrides:
        if not any(matches(pattern, n) for n in names):
            sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(f"{where}[{pattern!r}]: matches no quantizable module (there are {len(names)}, "
                              f"e.g. {sample}); fix the pattern or remove it")
    schemes: dict[str, Scheme] = {}
    skipped: list[str] = []
    conflicts: list[dict] = []
    for name in names:
        fields = default.fields()
        setters: dict[str, list[tuple[str, object]]] = {}
        for _, (pattern, values) in ordered:  # least specific first: later ones win
            if matches(pattern, name):
                for key, value in values.items():
                    setters.setdefault(key, []).append((pattern, value))
                    fields[key] = value
        for key, setter in setters.items():
            if len({repr(v) for _, v in setter}) > 1:
                conflicts.append({"module": name, "field": key, "winner": setter[-1][0], "value": setter[-1][1],
                                  "overruled": [p for p, _ in setter[:-1]]})
        if fields.pop("skip"):
            skipped.append(name)
        else:
            schemes[name] = Scheme.from_fields(fields, observer)
    return schemes, skipped, conflicts


# ------------------------------------------------------------------------------------- stored bits
def stored_bits(in_features: int, out_features: int, bits: int, group_size: int, scale_bits: int = 32) -> int:
    """Bits a ``QuantLinearWeightOnly`` checkpoint stores for one module's weight (``IntGrid.stored_bits``)."""
    return IntGrid(bits, group_size).stored_bits(in_features, out_features, scale_bits)


def average_bits(shapes: dict[str, tuple[int, int]], schemes: dict[str, tuple[int, int]], scale_bits: int = 32) -> float:
    """Stored bits per weight over the quantized modules: ``sum stored_bits / sum in*out``.

    ``shapes``: name -> (in, out); ``schemes``: name -> (bits, group_size) for the modules quantized.
    """
    total = sum(stored_bits(*shapes[n], b, g, scale_bits) for n, (b, g) in schemes.items())
    weights = sum(shapes[n][0] * shapes[n][1] for n in schemes)
    return total / weights


def summary(allocation: dict[str, dict]) -> str:
    """``"W3 g128: 120, W4 g128: 80, ..."`` counts of modules per scheme."""
    counts: dict[tuple, int] = {}
    for s in allocation.values():
        key = (s["bits"], s["group_size"])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"W{b} {'pc' if g == -1 else f'g{g}'}: {n}" for (b, g), n in sorted(counts.items()))
