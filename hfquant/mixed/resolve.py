"""Mixed precision in a run: resolve overrides over a model's modules, and ``bits: "auto"`` allocation.

``resolve_for_model`` turns the config's ``overrides`` (or a stored ``module_schemes``) into a per-module
``Scheme`` map plus the modules to keep float; ``auto_schemes`` measures sensitivity and allocates
the budget (``hfquant.mixed.budget``). The runner then quantizes with the map and records it in the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from hfquant.calibration.data import max_positions
from hfquant.config import AUTO, DEFAULT_CANDIDATES
from hfquant.core.errors import ConfigError
from hfquant.core.int_grid import IntGrid
from hfquant.core.schemes import resolve, summary
from hfquant.core.weight_format import format_from_config, Scheme
from hfquant.mixed import budget
from hfquant.mixed.sensitivity import measure_for_config
from hfquant.nn.graph import in_out_features, quantizable_modules

logger = logging.getLogger(__name__)


def is_mixed(config) -> bool:
    """Whether modules get schemes of their own: overrides, stored ``module_schemes``, ``bits: auto``, or a run
    format that assigns each module its own variant (GGUF's type mix)."""
    return (bool(config.overrides) or bool(config.module_schemes) or config.bits == AUTO
            or format_from_config(config) is not None)


def default_scheme(config) -> Scheme:
    """The run's own scheme (for ``bits: auto``: the largest candidate, used only outside the allocation)."""
    method = "rtn" if config.method == "rtn" else "gptq"
    fmt = format_from_config(config)
    if fmt is not None:
        return Scheme(fmt, method)
    if config.bits == AUTO:
        top = max(config.candidates or DEFAULT_CANDIDATES, key=lambda c: (c["bits"], -c["group_size"]))
        return Scheme(IntGrid(top["bits"], top["group_size"], config.sym, config.observer), "gptq")
    return Scheme(IntGrid(config.bits, config.group_size, config.sym, config.observer), method)


def resolve_for_model(model, config, keep: Callable[[str], bool]) -> tuple[dict[str, Scheme], list[str], list[dict]]:
    """``(schemes, skipped, conflicts)`` for the quantizable modules passing ``keep``."""
    modules = quantizable_modules(model, keep)
    names = list(modules)
    if config.module_schemes:
        unknown = sorted(set(config.module_schemes) - set(names))
        if unknown:
            raise ConfigError(f"HFQuantConfig.module_schemes: {unknown[:3]} are not quantizable modules of this model; "
                              "module_schemes must use exact module names")
        return {n: Scheme.from_fields(s, config.observer) for n, s in config.module_schemes.items()}, [], []
    default = default_scheme(config)
    schemes, skipped, conflicts = resolve(config.overrides, names, default, config.observer)
    schemes, skipped = default.format.assign(config, {n: in_out_features(m)[0] for n, m in modules.items()}, schemes,
                                             skipped)
    for c in conflicts:
        logger.info("override conflict: %s.%s = %r from %r (most specific) over %s", c["module"], c["field"],
                    c["value"], c["winner"], c["overruled"])
    return schemes, skipped, conflicts


def scale_bits_of(model) -> int:
    """Bits of one stored scale: scales are saved in the model's float dtype."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return torch.finfo(dtype).bits


def auto_schemes(model, config, keep: Callable[[str], bool], batches: list[torch.Tensor], tokenizer_fn,
                 progress: bool = True) -> tuple[dict[str, Scheme], dict]:
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
        grid = budget.TrialGrid(config.sym, config.observer, sb)
        found = budget.search_ppl(model, table, ids, config.max_ppl_increase, grid=grid, seq_len=seq_len)
        allocation = found.pop("allocation")
        report.update(max_ppl_increase=config.max_ppl_increase, predicted_avg_bits=found["avg_bits"], search=found)
    report["allocation"] = allocation
    logger.info("bits auto: %s", summary(allocation))
    schemes = {n: Scheme(IntGrid(s["bits"], s["group_size"], config.sym, config.observer), "gptq")
               for n, s in allocation.items()}
    return schemes, report
