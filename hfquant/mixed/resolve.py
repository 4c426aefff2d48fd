"""Mixed precision in a run: resolve overrides over a model's modules, and ``bits: "auto"`` allocation.

``resolve_for_model`` turns the config's ``overrides`` (or a stored ``module_schemes``) into a per-module
``ModuleScheme`` map plus the modules to keep float; ``auto_schemes`` measures sensitivity and allocates
the budget (``hfquant.mixed.budget``). The runner then quantizes with the map and records it in the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from hfquant.calibration.data import max_positions
from hfquant.calibration.graph import in_out_features, quantizable_modules
from hfquant.config import AUTO, DEFAULT_CANDIDATES
from hfquant.core.errors import ConfigError
from hfquant.core.gguf_blocks import BLOCK_TYPES
from hfquant.core.gguf_grids import symmetric
from hfquant.core.schemes import matches, ModuleScheme, resolve
from hfquant.mixed import budget, gguf_types
from hfquant.mixed.sensitivity import measure_for_config

logger = logging.getLogger(__name__)


def is_mixed(config) -> bool:
    return bool(config.overrides) or bool(config.module_schemes) or config.bits == AUTO or config.gguf_type is not None


def default_scheme(config) -> ModuleScheme:
    """The run's own scheme (for ``bits: auto``: the largest candidate, used only outside the allocation)."""
    if config.gguf_type is not None:
        return ModuleScheme(config.bits, config.group_size, config.sym, "rtn" if config.method == "rtn" else "gptq",
                            gguf_types.base_type(config.gguf_type))
    if config.bits == AUTO:
        top = max(config.candidates or DEFAULT_CANDIDATES, key=lambda c: (c["bits"], -c["group_size"]))
        return ModuleScheme(top["bits"], top["group_size"], config.sym, "gptq")
    return ModuleScheme(config.bits, config.group_size, config.sym, "rtn" if config.method == "rtn" else "gptq")


def resolve_for_model(model, config, keep: Callable[[str], bool]) -> tuple[dict[str, ModuleScheme], list[str], list[dict]]:
    """``(schemes, skipped, conflicts)`` for the quantizable modules passing ``keep``."""
    modules = quantizable_modules(model, keep)
    names = list(modules)
    if config.module_schemes:
        unknown = sorted(set(config.module_schemes) - set(names))
        if unknown:
            raise ConfigError(f"HFQuantConfig.module_schemes: {unknown[:3]} are not quantizable modules of this model; "
                              "module_schemes must use exact module names")
        return {n: ModuleScheme(**s) for n, s in config.module_schemes.items()}, [], []
    schemes, skipped, conflicts = resolve(config.overrides, names, default_scheme(config))
    if config.gguf_type is not None:
        schemes, skipped = _gguf_schemes(config, {n: in_out_features(m)[0] for n, m in modules.items()}, schemes,
                                         skipped)
    for c in conflicts:
        logger.info("override conflict: %s.%s = %r from %r (most specific) over %s", c["module"], c["field"],
                    c["value"], c["winner"], c["overruled"])
    return schemes, skipped, conflicts


def _gguf_schemes(config, cols: dict[str, int], schemes: dict[str, ModuleScheme], skipped: list[str]):
    """The GGUF type of every module (``gguf_types.module_types``, then a ``gguf_type`` override wins, then the
    row-length fallback); modules no block type fits (rows not a multiple of 32) stay float, as llama.cpp keeps
    them F16."""
    mix = gguf_types.module_types(cols, config.gguf_type)
    given = {n for p, f in (config.overrides or {}).items() if "gguf_type" in f for n in cols if matches(p, n)}
    out = {}
    for name, s in schemes.items():
        t = gguf_types.fit_row(s.gguf_type if name in given else mix[name], cols[name])
        if t not in BLOCK_TYPES:
            logger.info("%s: %d input features fit no GGUF block type; kept float (F16 in the file)", name, cols[name])
            skipped = [*skipped, name]
            continue
        bt = BLOCK_TYPES[t]
        out[name] = ModuleScheme(bt.bits, bt.group_size, symmetric(t), s.method, t)
    return out, skipped


def scale_bits_of(model) -> int:
    """Bits of one stored scale: scales are saved in the model's float dtype."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return torch.finfo(dtype).bits


def auto_schemes(model, config, keep: Callable[[str], bool], batches: list[torch.Tensor], tokenizer_fn,
                 progress: bool = True) -> tuple[dict[str, ModuleScheme], dict]:
    """Measure sensitivity, allocate the budget; returns ``(schemes, report)``."""
    table = measure_for_config(model, batches, keep, config, progress)
    sb = scale_bits_of(model)
    report: dict = {"sensitivity": table, "scale_bits": sb}
    if config.target_avg_bits is not None:
        allocation, avg = budget.allocate_bits(table, config.target_avg_bits, sb)
        report.update(target_avg_bits=config.target_avg_bits, predicted_avg_bits=avg)
    else:
        seq_len = min(512, max_positions(model.config) or 512)
        ids = budget.valid_ids(tokenizer_fn(), seq_len, 8)
        found = budget.search_ppl(model, table, ids, config.max_ppl_increase, sym=config.sym,
                                  observer=config.observer, scale_bits=sb, seq_len=seq_len)
        allocation = found.pop("allocation")
        report.update(max_ppl_increase=config.max_ppl_increase, predicted_avg_bits=found["avg_bits"], search=found)
    report["allocation"] = allocation
    logger.info("bits auto: %s", summary(allocation))
    schemes = {n: ModuleScheme(s["bits"], s["group_size"], config.sym, "gptq") for n, s in allocation.items()}
    return schemes, report


def summary(allocation: dict[str, dict]) -> str:
    """``"W3 g128: 120, W4 g128: 80, ..."`` counts of modules per scheme."""
    counts: dict[tuple, int] = {}
    for s in allocation.values():
        key = (s["bits"], s["group_size"])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"W{b} {'pc' if g == -1 else f'g{g}'}: {n}" for (b, g), n in sorted(counts.items()))
