"""Model-level quantization: RTN or GPTQ over every selected Linear, then the swap to quantized modules.

This layer knows torch modules and the calibration runner, not transformers: the caller says which
module names to keep float (``keep``) and provides calibration batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hfquant.algorithms.gptq import gptq_quantize
from hfquant.algorithms.rtn import dequantize_grouped, rtn_quantize
from hfquant.calibration.modules import (
    find_blocks,
    float_weight,
    quantizable_modules,
    set_float_weight_,
    set_submodule,
)
from hfquant.calibration.sequential import calibrate_blocks_
from hfquant.nn.w4a16 import QuantLinearW4A16

logger = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    """What happened to one module."""

    name: str
    method: str
    loss: float | None = None
    damp: float | None = None
    damp_retries: int = 0
    note: str = ""
    bits: int | None = None
    group_size: int | None = None


@dataclass
class WeightScheme:
    """The grid settings shared by RTN and GPTQ."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    observer: str = "minmax"


Schemes = dict  # module name -> hfquant.schemes.ModuleScheme; modules not in it use the run's scheme


def _scheme_of(name: str, scheme: WeightScheme, schemes: Schemes | None) -> tuple[WeightScheme, str | None]:
    """The grid and method (``None``: the run's own) of module ``name``."""
    s = (schemes or {}).get(name)
    if s is None:
        return scheme, None
    return WeightScheme(s.bits, s.group_size, s.sym, scheme.observer), s.method


def _rtn(module: nn.Module, scheme: WeightScheme):
    return rtn_quantize(float_weight(module).float(), scheme.bits, scheme.group_size, scheme.sym, scheme.observer)


def _swap(model: nn.Module, name: str, module: nn.Module, codes, scales, zeros, g_idx, scheme: WeightScheme) -> None:
    q = QuantLinearW4A16.from_float(module, codes, scales, zeros, g_idx, scheme.bits, scheme.group_size)
    set_submodule(model, name, q)


def quantize_rtn_(model: nn.Module, keep: Callable[[str], bool], scheme: WeightScheme,
                  schemes: Schemes | None = None) -> list[ModuleReport]:
    """Round-to-nearest every quantizable module whose name passes ``keep``; swap in quantized modules.

    ``schemes`` (name -> ``ModuleScheme``) gives modules their own grid."""
    reports = []
    for name, module in list(quantizable_modules(model, keep).items()):
        ws, _ = _scheme_of(name, scheme, schemes)
        codes, scales, zeros, g_idx = _rtn(module, ws)
        _swap(model, name, module, codes, scales, zeros, g_idx, ws)
        reports.append(ModuleReport(name, "rtn", bits=ws.bits, group_size=ws.group_size))
    return reports


def quantize_gptq_(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool], scheme: WeightScheme,
                   *, act_order: bool, static_groups: bool, damp_percent: float, block_size: int,
                   true_sequential: bool, progress: bool = True, store=None, hidden=None, dist=None,
                   onload=None, cache_outputs: bool = True, schemes: Schemes | None = None) -> list[ModuleReport]:
    """GPTQ over the model's repeated blocks, block by block; Linears outside the blocks get RTN.

    Each block's modules are swapped for quantized ones as soon as the block is done, so its float
    weights can be freed. ``store`` (a ``hfquant.progress.ProgressStore``) saves each finished block's
    results and resumes from the blocks it already holds. ``hidden`` (a ``HiddenStore``) keeps the
    activations between blocks; ``dist`` reduces statistics over calibration processes; ``onload`` (a
    ``hfquant.onload.LayerLoader``) loads each block's float weights when its turn comes;
    ``cache_outputs`` is ``run_block``'s. ``schemes`` (name -> ``ModuleScheme``) gives modules their own
    grid and method: modules that share an input (q/k/v, gate/up) are solved in one GPTQ call when their
    schemes are equal, otherwise one call per distinct scheme on the same Hessian; ``method: rtn`` modules
    are rounded to nearest (their rounded weights still feed the later modules of the block).
    """
    from hfquant.calibration.sequential import BlockCallbacks

    results: dict[str, tuple] = {}
    reports: dict[str, ModuleReport] = {}

    def fallback(name: str, module: nn.Module, full: str | None = None, note: str = "not called during calibration"):
        full = full or name
        ws, _ = _scheme_of(full, scheme, schemes)
        codes, scales, zeros, g_idx = _rtn(module, ws)
        results[full] = (module, codes, scales, zeros, g_idx)
        reports[full] = ModuleReport(full, "rtn", note=note, bits=ws.bits, group_size=ws.group_size)

    def solve_part(names: list[str], modules: list[nn.Module], hessian: torch.Tensor, ws: WeightScheme) -> None:
        weights = [float_weight(m).float() for m in modules]
        res = gptq_quantize(torch.cat(weights, 0), hessian, bits=ws.bits, group_size=ws.group_size,
                            sym=ws.sym, act_order=act_order, static_groups=static_groups,
                            damp_percent=damp_percent, block_size=block_size, observer=ws.observer)
        if res is None:
            for n, m in zip(names, modules):
                logger.warning("%s: Hessian not positive definite even at maximum damping; using RTN", n)
                fallback(n, m, note="Hessian not positive definite at any damping")
                set_float_weight_(m, dequantize_grouped(*results[n][1:]))
            return
        if res.retries:
            logger.warning("%s: Hessian needed damping %.4g (%d retries)", ", ".join(names), res.damp, res.retries)
        deq = res.dequantized()
        row = 0
        for n, m, w in zip(names, modules, weights):
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            set_float_weight_(m, deq[rows])
            results[n] = (m, res.codes[rows], res.scales[rows], res.zeros[rows], res.g_idx)
            reports[n] = ModuleReport(n, "gptq", loss=float(res.row_losses[rows].sum()), damp=res.damp,
                                      damp_retries=res.retries, bits=ws.bits, group_size=ws.group_size)

    def solve(block_name: str, group, hessian: torch.Tensor) -> None:
        names = [f"{block_name}.{n}" for n in group.names]
        parts: dict[tuple, list[int]] = {}  # equal schemes share one solve; insertion order = call order
        for i, n in enumerate(names):
            ws, method = _scheme_of(n, scheme, schemes)
            parts.setdefault((ws.bits, ws.group_size, ws.sym, ws.observer, method or "gptq"), []).append(i)
        for (bits, group_size, sym, observer, method), idx in parts.items():
            ws = WeightScheme(bits, group_size, sym, observer)
            if method == "rtn":
                for i in idx:
                    fallback(names[i], group.modules[i], note="method rtn (override)")
                    set_float_weight_(group.modules[i], dequantize_grouped(*results[names[i]][1:]))
                continue
            solve_part([names[i] for i in idx], [group.modules[i] for i in idx], hessian, ws)

    order: list[str] = []

    def swap(prefix: str | None) -> None:
        """Swap every pending result (under ``prefix``) for its quantized module and drop the float one."""
        for name in [n for n in results if prefix is None or n.startswith(prefix + ".")]:
            module, codes, scales, zeros, g_idx = results.pop(name)
            _swap(model, name, module, codes, scales, zeros, g_idx, _scheme_of(name, scheme, schemes)[0])
            order.append(name)

    blocks_name, blocks = find_blocks(model)

    def after_block(index: int, block_name: str) -> None:
        # Modules of this block the calibration never reached: RTN while their float weights are here.
        for n, m in quantizable_modules(blocks[index], keep, prefix=block_name).items():
            if f"{block_name}.{n}" not in results and f"{block_name}.{n}" not in reports:
                fallback(f"{block_name}.{n}", m)
        swap(block_name)
        if onload is not None:
            onload.block_done(index)

    def before_block(index: int) -> None:
        swap(None)  # blocks restored by ``resume`` (the only results pending here)
        if onload is not None:
            onload.load_block(index)

    callbacks = BlockCallbacks(after_capture=onload.capture_done if onload is not None else None,
                               before_block=before_block, after_block=after_block)
    resume = _GPTQResume(model, store, results, reports) if store is not None else None
    calibrate_blocks_(model, batches, keep, solve, true_sequential, progress=progress, resume=resume,
                      store=hidden, dist=dist, callbacks=callbacks,
                      cache_outputs=cache_outputs)
    if onload is not None:
        onload.load_rest()
    for name, module in quantizable_modules(model, keep).items():
        if isinstance(module, QuantLinearW4A16) or name in reports:
            continue
        fallback(name, module, note="outside the repeated blocks")
    swap(None)
    return [reports[n] for n in order]


_RESULT_FIELDS = ("codes", "scales", "zeros", "g_idx")


class _GPTQResume:
    """``BlockResume`` for GPTQ: a block's state is its modules' codes/scales/zeros/g_idx and reports."""

    def __init__(self, model: nn.Module, store, results: dict, reports: dict):
        self.model, self.store, self.results, self.reports = model, store, results, reports

    def start(self):
        done = self.store.blocks_done
        for i in range(done):
            tensors, meta = self.store.load_block(i)
            for name, report in meta.items():
                module = self.model.get_submodule(name)
                self.results[name] = (module, *(tensors[f"{name}:{f}"] for f in _RESULT_FIELDS))
                self.reports[name] = ModuleReport(**report)
        return done, (self.store.load_hidden() if done else None)

    def done(self, index: int, block_name: str, outputs: list[torch.Tensor]) -> None:
        names = [n for n in self.results if n.startswith(block_name + ".")]
        tensors = {f"{n}:{f}": t for n in names for f, t in zip(_RESULT_FIELDS, self.results[n][1:])}
        self.store.save_block(index, tensors, {n: asdict(self.reports[n]) for n in names}, outputs)


def reports_as_dicts(reports: list[ModuleReport]) -> list[dict]:
    return [asdict(r) for r in reports]
