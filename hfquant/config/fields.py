"""``HFQuantConfig``'s one field table, read from the dataclass declarations (``read_by`` metadata), and what is
derived from it: flat names, defaults, the fields each method reads.

Membership and readers are stated on the fields; only the two key orders below are stated here: ``config.json``'s
(``to_dict``, ``DEFAULTS``: config.json files stay byte-identical) and the recipe's ``quantization`` keys'
(``METHOD_FIELDS``: the resolved recipe lists them in that order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hfquant.config.sections import Section

# A section name stands for its fields, less those placed on their own.
DICT_ORDER = ("method", "quality", "gptq", "calibration", "modules_to_not_convert", "lm_head_bits", "smoothquant",
              "save_format", "checkpoint_format", "mixed", "gguf")
RECIPE_ORDER = ("quality", "smoothquant", "gptq", "modules_to_not_convert", "mixed", "lm_head_bits", "gguf",
                "save_format")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One setting: its flat name, where it lives (``section`` None: on ``HFQuantConfig`` itself) and who reads it."""

    flat: str
    section: str | None
    name: str  # in its section (the flat name at the top level)
    default: Any
    methods: tuple[str, ...]  # the methods that read it (``METHOD_FIELDS``)
    every_method: bool  # read by every method whatever ``methods`` says


def section_classes(config_cls) -> dict[str, type[Section]]:
    """Section attribute name -> its dataclass, in declaration order."""
    return {f.name: f.default_factory for f in dataclasses.fields(config_cls)
            if isinstance(f.default_factory, type) and issubclass(f.default_factory, Section)}


def _spec(f: dataclasses.Field, section: str | None) -> FieldSpec:
    meta = f.metadata
    return FieldSpec(meta.get("flat") or f.name, section, f.name, f.default, tuple(meta.get("methods", ())),
                     bool(meta.get("every_method")))


def field_table(config_cls) -> tuple[FieldSpec, ...]:
    """Every setting of ``config_cls`` (sections expanded; ``quant_method``, the registration key, left out), in
    ``DICT_ORDER``."""
    sections = section_classes(config_cls)
    specs: list[FieldSpec] = []
    for f in dataclasses.fields(config_cls):
        if f.name in sections:
            specs += [_spec(sf, f.name) for sf in dataclasses.fields(sections[f.name])]
        elif "methods" in f.metadata:
            specs.append(_spec(f, None))
    by_flat = {s.flat: s for s in specs}
    ordered = _in_order(DICT_ORDER, by_flat)
    if sorted(s.flat for s in ordered) != sorted(by_flat):
        raise AssertionError(f"DICT_ORDER places {sorted(s.flat for s in ordered)}, the fields are {sorted(by_flat)}")
    return tuple(ordered)


def _in_order(order, by_flat: dict[str, FieldSpec]) -> list[FieldSpec]:
    """The specs ``order`` names: a section (its fields not named in ``order`` themselves), or a flat name."""
    sections = {s.section for s in by_flat.values()}
    out: list[FieldSpec] = []
    for item in order:
        if item in sections:
            out += [s for s in by_flat.values() if s.section == item and s.flat not in order]
        else:
            out.append(by_flat[item])
    return out


def method_fields(specs, methods) -> dict[str, tuple[str, ...]]:
    """method -> the flat fields it reads, in ``RECIPE_ORDER``."""
    ordered = _in_order(RECIPE_ORDER, {s.flat: s for s in specs})
    unplaced = sorted({s.flat for s in specs if s.methods} - {s.flat for s in ordered})
    if unplaced:
        raise AssertionError(f"RECIPE_ORDER does not place {unplaced}, which methods read")
    return {m: tuple(s.flat for s in ordered if m in s.methods) for m in methods}
