"""Model-level quantization: RTN or GPTQ over every selected Linear, then the swap to quantized modules.

This layer knows torch modules and the calibration runner, not transformers: the caller says which
module names to keep float (``keep``) and provides calibration batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hfquant.calibration.distributed import Dist
from hfquant.calibration.graph import (
    find_blocks,
    float_weight,
    in_out_features,
    is_conv1d,
    quantizable_modules,
    set_float_weight_,
    set_submodule,
)
from hfquant.calibration.reconstruct import reconstruct_block_, RoundedWeight
from hfquant.calibration.sequential import BlockCallbacks, calibrate_blocks_
from hfquant.core.gguf_blocks import block_type, dequantize_rows, pack_rows, unpack_rows
from hfquant.core.gguf_grids import rtn_block_quantize
from hfquant.core.gptq import gptq_solve, GPTQResult, join_rows, prepare_hessian
from hfquant.core.grids import dequantize_grouped, group_bounds, rtn_quantize
from hfquant.nn.gguf import QuantLinearGGUF
from hfquant.nn.weight_only import QuantLinearWeightOnly, storage_dtype

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
    gguf_type: str | None = None  # a GGUF block type: the grid and the stored layout (QuantLinearGGUF)


QUANTIZED = (QuantLinearWeightOnly, QuantLinearGGUF)

Schemes = dict  # module name -> hfquant.core.schemes.ModuleScheme; modules not in it use the run's scheme


def _scheme_of(name: str, scheme: WeightScheme, schemes: Schemes | None) -> tuple[WeightScheme, str | None]:
    """The grid and method (``None``: the run's own) of module ``name``."""
    s = (schemes or {}).get(name)
    if s is None:
        return scheme, None
    return WeightScheme(s.bits, s.group_size, s.sym, scheme.observer, s.gguf_type), s.method


def _rtn(module: nn.Module, scheme: WeightScheme) -> tuple[torch.Tensor, ...]:
    """The stored tensors of ``module`` rounded to nearest: ``(codes, scales, zeros, g_idx)``, or ``(blocks,)``
    (GGUF, ``gguf_blocks.pack_rows``'s bytes)."""
    w = float_weight(module).float()
    if scheme.gguf_type is not None:
        return (pack_rows(scheme.gguf_type, *rtn_block_quantize(scheme.gguf_type, w)),)
    return rtn_quantize(w, scheme.bits, scheme.group_size, scheme.sym, scheme.observer,
                        scale_dtype=storage_dtype(module))


def _stored(res: GPTQResult) -> tuple[torch.Tensor, ...]:
    """A solve's stored tensors, as ``_rtn`` returns them."""
    if res.gguf_type is not None:
        return (pack_rows(res.gguf_type, res.codes, res.params),)
    return res.codes, res.scales, res.zeros, res.g_idx


def _dequantized(tensors: tuple[torch.Tensor, ...], scheme: WeightScheme, cols: int) -> torch.Tensor:
    """The float32 weight the stored tensors hold."""
    if scheme.gguf_type is not None:
        return dequantize_rows(scheme.gguf_type, tensors[0], cols)
    return dequantize_grouped(*tensors)


def share_result(dist: Dist, res: GPTQResult | None, owner: int, module: nn.Module, group_size: int, device,
                 gguf_type: str | None = None, with_pre: bool = False, rows: int | None = None) -> GPTQResult | None:
    """``owner``'s result of one module's GPTQ solve, on every rank (``None`` everywhere when it failed). A GGUF
    result travels as its packed blocks (``gguf_type``; ``group_size`` is then not used). ``with_pre``: the
    pre-rounding weight too (block reconstruction starts from it). ``rows``: a slab of that many rows of the
    module's weight (default: all of them)."""
    cols, all_rows = in_out_features(module)
    rows = all_rows if rows is None else rows
    meta = torch.tensor([res is not None, res.damp if res else 0.0, res.retries if res else 0],
                        dtype=torch.float64, device=device)
    dist.broadcast_(meta, owner)
    if not meta[0]:
        return None
    if gguf_type is not None:
        bt = block_type(gguf_type)
        data = (pack_rows(gguf_type, res.codes, res.params) if res is not None else
                torch.empty(rows, cols // bt.block_values * bt.block_bytes, dtype=torch.uint8, device=device))
        losses = res.row_losses if res is not None else torch.empty(rows, device=device)
        dist.broadcast_(data, owner)
        dist.broadcast_(losses, owner)
        if res is None:
            codes, params = unpack_rows(gguf_type, data, cols)
            empty = torch.empty(0, device=device)  # a GGUF result's grids live in its params
            res = GPTQResult(codes=codes, scales=empty, zeros=empty, g_idx=empty,
                             row_losses=losses, damp=float(meta[1]), retries=int(meta[2]), gguf_type=gguf_type,
                             params=params)
        return res
    n_groups = len(group_bounds(cols, group_size))
    if res is None:
        res = GPTQResult(codes=torch.empty(rows, cols, dtype=torch.int32, device=device),
                         scales=torch.empty(rows, n_groups, device=device),
                         zeros=torch.empty(rows, n_groups, dtype=torch.int32, device=device),
                         g_idx=torch.empty(cols, dtype=torch.int32, device=device),
                         row_losses=torch.empty(rows, device=device), damp=float(meta[1]), retries=int(meta[2]),
                         pre=torch.empty(rows, cols, device=device) if with_pre else None)
    for t in (res.codes, res.scales, res.zeros, res.g_idx, res.row_losses, *((res.pre,) if with_pre else ())):
        dist.broadcast_(t, owner)
    return res


def solve_shared(dist: Dist, units: list[tuple[nn.Module, int, str | None]], solve_rows, device,
                 with_pre: bool = False) -> list[GPTQResult | None]:
    """The GPTQ results of a stage's modules on every rank, the solves shared out among the ranks.

    ``units``: ``(module, group_size, gguf_type)`` per module; ``solve_rows(i, r0, r1)`` solves rows ``r0:r1`` of unit
    ``i``'s weight (called on their owner only). Each weight is cut into row slabs (``Dist.row_slabs``) owned by the
    ranks, balanced by cost; every rank first solves all its slabs, then the owners broadcast them in order, so
    the ranks solve at the same time. One process solves every weight whole, in order."""
    slabs = [(i, r0, r1) for i, (m, _, _) in enumerate(units) for r0, r1 in dist.row_slabs(in_out_features(m)[1], device)]
    owners = dist.owners([float(r1 - r0) * in_out_features(units[i][0])[0] ** 2 for i, r0, r1 in slabs])
    mine = {k: solve_rows(*slab) for k, (slab, owner) in enumerate(zip(slabs, owners)) if owner == dist.rank}
    parts: list[list] = [[] for _ in units]
    for k, ((i, r0, r1), owner) in enumerate(zip(slabs, owners)):
        res = mine.get(k)
        if dist.active:
            module, group_size, gguf_type = units[i]
            res = share_result(dist, res, owner, module, group_size, device, gguf_type, with_pre, rows=r1 - r0)
        parts[i].append(res)
    return [join_rows(p) for p in parts]


def _swap(model: nn.Module, name: str, module: nn.Module, tensors: tuple[torch.Tensor, ...], scheme: WeightScheme) -> None:
    if scheme.gguf_type is not None:
        q = QuantLinearGGUF.from_blocks(module, tensors[0], scheme.gguf_type, storage_dtype(module))
    else:
        q = QuantLinearWeightOnly.from_float(module, *tensors, scheme.bits, scheme.group_size)
    set_submodule(model, name, q)


def quantize_rtn_(model: nn.Module, keep: Callable[[str], bool], scheme: WeightScheme,
                  schemes: Schemes | None = None) -> list[ModuleReport]:
    """Round-to-nearest every quantizable module whose name passes ``keep``; swap in quantized modules.

    ``schemes`` (name -> ``ModuleScheme``) gives modules their own grid."""
    reports = []
    for name, module in list(quantizable_modules(model, keep).items()):
        ws, _ = _scheme_of(name, scheme, schemes)
        _swap(model, name, module, _rtn(module, ws), ws)
        reports.append(ModuleReport(name, "rtn", bits=ws.bits, group_size=ws.group_size))
    return reports


def quantize_gptq_(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool], scheme: WeightScheme,
                   *, act_order: bool, static_groups: bool, damp_percent: float, block_size: int,
                   true_sequential: bool, progress: bool = True, store=None, hidden=None, dist=None,
                   onload=None, cache_outputs: bool = True, schemes: Schemes | None = None,
                   timings: dict | None = None, gptaq_alpha: float | None = None, reconstruct_steps: int = 0,
                   seed: int = 0) -> list[ModuleReport]:
    """GPTQ over the model's repeated blocks, block by block; Linears outside the blocks get RTN.

    Each block's modules are swapped for quantized ones as soon as the block is done, so its float
    weights can be freed. ``store`` (a ``hfquant.quantize.resume.ResumeStore``) saves each finished block's
    results and resumes from the blocks it already holds. ``hidden`` (a ``HiddenStore``) keeps the
    activations between blocks; ``dist`` reduces statistics over calibration processes; ``onload`` (a
    ``hfquant.calibration.onload.LayerLoader``) loads each block's float weights when its turn comes;
    ``cache_outputs`` is ``run_block``'s. ``schemes`` (name -> ``ModuleScheme``) gives modules their own
    grid and method; ``method: rtn`` modules are rounded to nearest (their rounded weights still feed the
    later modules of the block).
    ``timings`` (a dict) receives ``solve_seconds``, the time spent in the solves (and their broadcasts).
    ``gptaq_alpha``: asymmetric calibration (GPTAQ) with that strength; ``None``: plain GPTQ.
    ``reconstruct_steps``: block reconstruction after each block's solves (``hfquant.calibration.reconstruct``),
    that many steps, batches in an order seeded by ``seed``; 0: none.

    Every module is solved on its own (q, k and v one after another on the shared Hessian factor), whether
    one process or several run: a fixed unit of work, so which rank solves it does not change its bits.
    """
    run = _GPTQRun(model, keep, scheme, schemes, act_order=act_order, static_groups=static_groups,
                   damp_percent=damp_percent, block_size=block_size, dist=dist or Dist(), onload=onload,
                   timings=timings, gptaq_alpha=gptaq_alpha, reconstruct_steps=reconstruct_steps, seed=seed)
    return run.run(batches, true_sequential, progress=progress, store=store, hidden=hidden,
                   cache_outputs=cache_outputs)


class _GPTQRun:
    """One ``quantize_gptq_`` run. It is the only owner of the run's state:

    * ``results``: name -> ``(module, codes, scales, zeros, g_idx)``, modules quantized (or restored from the
      resume store) but not yet swapped for their quantized module;
    * ``reports``: name -> ``ModuleReport``, every module handled so far;
    * ``order``: the names in the order they were swapped, the order of the returned reports.

    ``run`` hands ``solve`` and the block callbacks (``before_block``, ``after_block``) to ``calibrate_blocks_``;
    a resume store reaches the state only through ``restore`` and ``block_results`` (``_GPTQResume``).
    """

    def __init__(self, model: nn.Module, keep: Callable[[str], bool], scheme: WeightScheme, schemes: Schemes | None,
                 *, act_order: bool, static_groups: bool, damp_percent: float, block_size: int, dist: Dist,
                 onload=None, timings: dict | None = None, gptaq_alpha: float | None = None,
                 reconstruct_steps: int = 0, seed: int = 0):
        self.model, self.keep, self.scheme, self.schemes = model, keep, scheme, schemes
        self.gptaq_alpha, self.reconstruct_steps, self.seed = gptaq_alpha, reconstruct_steps, seed
        self.pre: dict[str, torch.Tensor] = {}  # name -> GPTQ's pre-rounding weight in code units (reconstruction)
        self.act_order, self.static_groups = act_order, static_groups
        self.damp_percent, self.block_size = damp_percent, block_size
        self.dist, self.onload, self.timings = dist, onload, timings
        self.results: dict[str, tuple] = {}
        self.reports: dict[str, ModuleReport] = {}
        self.order: list[str] = []
        self.blocks_name, self.blocks = find_blocks(model)

    def run(self, batches: list[torch.Tensor], true_sequential: bool, *, progress: bool, store, hidden,
            cache_outputs: bool) -> list[ModuleReport]:
        """Calibrate and quantize block by block, then RTN and swap what is left; the reports in swap order."""
        onload = self.onload
        callbacks = BlockCallbacks(after_capture=onload.capture_done if onload is not None else None,
                                   before_block=self.before_block, after_block=self.after_block)
        resume = _GPTQResume(self, store) if store is not None else None
        calibrate_blocks_(self.model, batches, self.keep, self.solve, true_sequential, progress=progress,
                          resume=resume, store=hidden, dist=self.dist, callbacks=callbacks,
                          cache_outputs=cache_outputs,
                          asymmetric=self.gptaq_alpha is not None or self.reconstruct_steps > 0,
                          refine=self.refine if self.reconstruct_steps > 0 else None)
        if onload is not None:
            onload.load_rest()
        for name, module in quantizable_modules(self.model, self.keep).items():
            if isinstance(module, QUANTIZED) or name in self.reports:
                continue
            self.fallback(name, module, note="outside the repeated blocks")
        self.swap(None)
        return [self.reports[n] for n in self.order]

    def scheme_of(self, name: str) -> tuple[WeightScheme, str | None]:
        return _scheme_of(name, self.scheme, self.schemes)

    # ---- recording results

    def fallback(self, name: str, module: nn.Module, note: str = "not called during calibration") -> None:
        """Round ``module`` to nearest and record it."""
        ws, _ = self.scheme_of(name)
        self.results[name] = (module, *_rtn(module, ws))
        self.reports[name] = ModuleReport(name, "rtn", note=note, bits=ws.bits, group_size=ws.group_size)

    def fallback_in_block(self, name: str, module: nn.Module, note: str) -> None:
        """``fallback`` inside a block being calibrated: later stages read the rounded weight."""
        self.fallback(name, module, note=note)
        set_float_weight_(module, _dequantized(self.results[name][1:], self.scheme_of(name)[0],
                                               in_out_features(module)[0]))

    def accept(self, name: str, module: nn.Module, res: GPTQResult | None, ws: WeightScheme) -> None:
        """Record one module's solve (or its RTN fallback) and give later stages its dequantized weight."""
        if res is None:
            logger.warning("%s: Hessian not positive definite even at maximum damping; using RTN", name)
            self.fallback_in_block(name, module, note="Hessian not positive definite at any damping")
            return
        if res.retries:
            logger.warning("%s: Hessian needed damping %.4g (%d retries)", name, res.damp, res.retries)
        set_float_weight_(module, res.dequantized())
        self.results[name] = (module, *_stored(res))
        if self.reconstruct_steps > 0 and res.gguf_type is None:
            self.pre[name] = res.pre / res.scales[:, res.g_idx.long()]
        self.reports[name] = ModuleReport(name, "gptq", loss=res.loss, damp=res.damp, damp_retries=res.retries,
                                          bits=ws.bits, group_size=ws.group_size)

    def restore(self, modules: dict[str, tuple[tuple[torch.Tensor, ...], ModuleReport]]) -> None:
        """Record modules of a finished block restored from a resume store: name -> ``((codes, scales, zeros,
        g_idx), report)``, in the order they were saved. They are swapped before the next block runs."""
        for name, (tensors, report) in modules.items():
            self.results[name] = (self.model.get_submodule(name), *tensors)
            self.reports[name] = report

    def block_results(self, block_name: str) -> tuple[dict[str, tuple], dict[str, ModuleReport]]:
        """The pending results ``(codes, scales, zeros, g_idx)`` and reports of block ``block_name``'s modules."""
        names = [n for n in self.results if n.startswith(block_name + ".")]
        return {n: self.results[n][1:] for n in names}, {n: self.reports[n] for n in names}

    # ---- calibrate_blocks_'s callbacks

    def solve(self, block_name: str, group, hessian: torch.Tensor, cross: torch.Tensor | None = None) -> None:
        """One GPTQ solve per module on the shared Hessian (its factor computed once per rank that needs it).
        With several processes each module has one owner (balanced by cost), which solves and broadcasts.
        ``cross``: the group's asymmetric-calibration term, shared like the Hessian; used in a GPTAQ run only (a
        run with block reconstruction alone carries the float stream for its targets, not for the solves)."""
        t0 = time.perf_counter()
        units = []
        for short, module in zip(group.names, group.modules):
            name = f"{block_name}.{short}"
            ws, method = self.scheme_of(name)
            if method == "rtn":
                self.fallback_in_block(name, module, note="method rtn (override)")
            else:
                units.append((name, module, ws))
        factor: list = []  # prepared on first use: [HessianFactor or None]

        def solve_rows(i: int, r0: int, r1: int) -> GPTQResult | None:
            _, module, ws = units[i]
            if not factor:
                factor.append(prepare_hessian(hessian, act_order=self.act_order, damp_percent=self.damp_percent))
            if factor[0] is None:
                return None
            return gptq_solve(float_weight(module)[r0:r1].float(), factor[0], bits=ws.bits, group_size=ws.group_size,
                              sym=ws.sym, static_groups=self.static_groups, block_size=self.block_size,
                              observer=ws.observer, scale_dtype=storage_dtype(module), gguf_type=ws.gguf_type,
                              cross=cross if self.gptaq_alpha is not None else None, cross_alpha=self.gptaq_alpha or 0.0)

        results = solve_shared(self.dist, [(m, ws.group_size, ws.gguf_type) for _, m, ws in units], solve_rows,
                               hessian.device, with_pre=self.reconstruct_steps > 0)
        for (name, module, ws), res in zip(units, results):
            self.accept(name, module, res, ws)
        if self.timings is not None:
            self.timings["solve_seconds"] = self.timings.get("solve_seconds", 0.0) + time.perf_counter() - t0

    def refine(self, block_name: str, block: nn.Module, inputs, targets) -> None:
        """Block reconstruction (``hfquant.calibration.reconstruct``) of the block's GPTQ-solved modules; their
        stored codes and scales and their weights are replaced when it lowers the block's output error."""
        names = [n for n in self.pre if n.startswith(block_name + ".")]
        units = []
        for name in names:
            module, codes, scales, zeros, g_idx = self.results[name]
            g = g_idx.long()
            units.append(RoundedWeight(name[len(block_name) + 1:], self.pre.pop(name), zeros.float()[:, g], scales.float(),
                                       g, 2 ** self.scheme_of(name)[0].bits - 1, module.weight.dtype,
                                       storage_dtype(module), is_conv1d(module)))
        if not units:
            return
        found = reconstruct_block_(block, units, inputs, targets, steps=self.reconstruct_steps, seed=self.seed,
                                   dist=self.dist)
        if found is None:
            logger.info("%s: block reconstruction did not lower the output error; GPTQ's result kept", block_name)
            return
        before, after = found["error"]
        for u in units:
            name = f"{block_name}.{u.name}"
            module, _, _, zeros, g_idx = self.results[name]
            codes, scales, weight = found[u.name]
            self.results[name] = (module, codes, scales, zeros, g_idx)
            set_float_weight_(module, weight)
            self.reports[name].note = f"block reconstruction: output error x{after / before:.3f}"

    def swap(self, prefix: str | None) -> None:
        """Swap every pending result (under ``prefix``) for its quantized module and drop the float one."""
        for name in [n for n in self.results if prefix is None or n.startswith(prefix + ".")]:
            module, *tensors = self.results.pop(name)
            _swap(self.model, name, module, tuple(tensors), self.scheme_of(name)[0])
            self.order.append(name)

    def before_block(self, index: int) -> None:
        self.swap(None)  # blocks restored by ``resume`` (the only results pending here)
        if self.onload is not None:
            self.onload.load_block(index)

    def after_block(self, index: int, block_name: str) -> None:
        # Modules of this block the calibration never reached: RTN while their float weights are here.
        for n, m in quantizable_modules(self.blocks[index], self.keep, prefix=block_name).items():
            if f"{block_name}.{n}" not in self.results and f"{block_name}.{n}" not in self.reports:
                self.fallback(f"{block_name}.{n}", m)
        self.swap(block_name)
        if self.onload is not None:
            self.onload.block_done(index)


class _GPTQResume:
    """``BlockResume`` for a ``_GPTQRun`` over a ``ResumeStore``: a finished block's state is its modules' codes,
    scales, zeros, g_idx (``ResumeStore.save_modules``) and reports (as dicts).

    It holds none of that state: restored modules are handed to ``run.restore``, and what a finished block
    saves is asked of ``run.block_results``."""

    def __init__(self, run: _GPTQRun, store):
        self.run, self.store = run, store

    def start(self):
        done = self.store.blocks_done
        for i in range(done):
            modules, meta = self.store.load_modules(i)
            self.run.restore({name: (modules[name], ModuleReport(**report)) for name, report in meta.items()})
        return done, (self.store.load_hidden() if done else None)

    def done(self, index: int, block_name: str, outputs: list[torch.Tensor]) -> None:
        results, reports = self.run.block_results(block_name)
        self.store.save_modules(index, results, {n: asdict(r) for n, r in reports.items()}, outputs)


def reports_as_dicts(reports: list[ModuleReport]) -> list[dict]:
    return [asdict(r) for r in reports]
