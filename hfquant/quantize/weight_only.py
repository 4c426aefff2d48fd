"""Model-level quantization: RTN or GPTQ over every selected Linear, then the swap to quantized modules.

This layer knows torch modules and the calibration runner, not transformers: the caller says which
module names to keep float (``keep``) and provides calibration batches. What a weight is stored as is its
``Scheme``'s weight format (``hfquant.core.weight_format``); nothing here depends on which format it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hfquant.calibration.distributed import Dist, solve_shared
from hfquant.calibration.sequential import BlockCallbacks, BlockRunOptions, calibrate_blocks_
from hfquant.core.gptq import gptq_solve, GPTQResult, prepare_hessian, split_rows
from hfquant.core.weight_format import Scheme
from hfquant.nn.expert_linear import ExpertLinear
from hfquant.nn.experts import fuse_experts_
from hfquant.nn.graph import find_blocks, float_weight, in_out_features, is_conv1d, quantizable_modules, set_float_weight_, set_submodule
from hfquant.nn.stored import quantized_module, storage_dtype
from hfquant.quantize.reconstruct import reconstruct_block_, RoundedWeight

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
class RunOptions:
    """How a GPTQ run executes (not what it computes): ``progress`` bars; ``store`` (a
    ``hfquant.quantize.resume.ResumeStore``) saves each finished block and resumes from the blocks it holds;
    ``hidden`` (a ``HiddenStore``) keeps the activations between blocks; ``dist`` reduces statistics over
    calibration processes; ``onload`` (a ``hfquant.calibration.onload.LayerLoader``) loads each block's float
    weights when its turn comes; ``cache_outputs`` is as in ``BlockRunOptions``; ``timings`` (a dict) receives
    ``solve_seconds``, the time spent in the solves (and their broadcasts); an expert's projection that saw fewer
    than ``expert_min_tokens`` routed tokens is rounded to nearest instead of solved."""

    progress: bool = True
    store: object = None
    hidden: object = None
    dist: Dist | None = None
    onload: object = None
    cache_outputs: bool = True
    timings: dict | None = None
    expert_min_tokens: int = 0


Schemes = dict  # module name -> Scheme; modules not in it use the run's scheme


def _report(name: str, method: str, scheme: Scheme, **fields) -> ModuleReport:
    return ModuleReport(name, method, bits=scheme.bits, group_size=scheme.group_size, **fields)


def _rtn(module: nn.Module, scheme: Scheme) -> tuple[torch.Tensor, ...]:
    """The stored tensors of ``module`` rounded to nearest on its format."""
    return scheme.format.rtn(float_weight(module).float(), storage_dtype(module))


def _swap(model: nn.Module, name: str, module: nn.Module, stored: tuple[torch.Tensor, ...], scheme: Scheme) -> None:
    set_submodule(model, name, quantized_module(module, scheme.format, stored))


def quantize_rtn_(model: nn.Module, keep: Callable[[str], bool], scheme: Scheme,
                  schemes: Schemes | None = None) -> list[ModuleReport]:
    """Round-to-nearest every quantizable module whose name passes ``keep``; swap in quantized modules.

    ``schemes`` (name -> ``Scheme``) gives modules their own format."""
    reports = []
    for name, module in list(quantizable_modules(model, keep).items()):
        s = (schemes or {}).get(name, scheme)
        _swap(model, name, module, _rtn(module, s), s)
        reports.append(_report(name, "rtn", s))
    return reports


def quantize_gptq_(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool], scheme: Scheme,
                   args, schemes: Schemes | None = None, seed: int = 0,
                   options: RunOptions | None = None) -> list[ModuleReport]:
    """GPTQ over the model's repeated blocks, block by block; Linears outside the blocks get RTN.

    ``args``: the config's ``GPTQArgs`` section (act-order, static groups, damping, block size, true-sequential,
    GPTAQ and its strength, block reconstruction steps). Each block's modules are swapped for quantized ones as
    soon as the block is done, so its float weights can be freed. ``schemes`` (name -> ``Scheme``) gives modules
    their own format and method; ``method: rtn`` modules are rounded to nearest (their rounded weights still feed
    the later modules of the block). Block reconstruction (``hfquant.quantize.reconstruct``) takes its batches in
    an order seeded by ``seed``. ``options``: how the run executes (``RunOptions``).

    On the CPU every module is solved on its own (q, k and v one after another on the shared Hessian factor), whether
    one process or several run: a fixed unit of work, so which rank solves it does not change its bits. On CUDA with
    one process the modules that read one input and share a format are stacked into one solve (``solve_stacked``).
    """
    run = _GPTQRun(model, keep, scheme, schemes, args, seed, options or RunOptions())
    return run.run(batches)


def solve_stacked(weights: list[tuple[torch.Tensor, object, torch.dtype]], solve) -> list[GPTQResult | None]:
    """The GPTQ results of weights ``(w [rows, cols], format, scale dtype)`` that read one input (one Hessian factor),
    those of one format and scale dtype solved as one stacked weight (``solve(w, format, scale_dtype)``) and split
    back: GPTQ treats rows independently, so on a GPU q/k/v (or gate/up) make one solve's launches instead of three
    (two). The stacked solve's GEMMs have other shapes than the separate ones, so the bits may differ where the GEMM's
    algorithm depends on the shape (cuBLAS): used on CUDA, where each module has one owner anyway."""
    results: list[GPTQResult | None] = [None] * len(weights)
    kinds: dict[tuple, list[int]] = {}
    for i, (w, fmt, dtype) in enumerate(weights):
        kinds.setdefault((fmt, dtype, w.shape[1]), []).append(i)
    for (fmt, dtype, _), idx in kinds.items():
        res = solve(torch.cat([weights[i][0].float() for i in idx]), fmt, dtype)
        if res is not None:
            for i, part in zip(idx, split_rows(res, [weights[i][0].shape[0] for i in idx]), strict=True):
                results[i] = part
    return results


class _GPTQRun:
    """One ``quantize_gptq_`` run. It is the only owner of the run's state:

    * ``results``: name -> ``(module, *stored tensors)``, modules quantized (or restored from the resume store) but
      not yet swapped for their quantized module;
    * ``reports``: name -> ``ModuleReport``, every module handled so far;
    * ``order``: the names in the order they were swapped, the order of the returned reports.

    ``run`` hands ``solve`` and the block callbacks (``before_block``, ``after_block``) to ``calibrate_blocks_``;
    a resume store reaches the state only through ``restore`` and ``block_results`` (``_GPTQResume``).
    """

    def __init__(self, model: nn.Module, keep: Callable[[str], bool], scheme: Scheme, schemes: Schemes | None,
                 args, seed: int, options: RunOptions):
        self.model, self.keep, self.scheme, self.schemes = model, keep, scheme, schemes
        self.args, self.seed, self.options = args, seed, options
        self.dist = options.dist or Dist()
        self.reconstruct_steps = args.reconstruct_steps
        self.pre: dict[str, torch.Tensor] = {}  # name -> GPTQ's pre-rounding weight in code units (reconstruction)
        self.results: dict[str, tuple] = {}
        self.reports: dict[str, ModuleReport] = {}
        self.order: list[str] = []
        self.blocks_name, self.blocks = find_blocks(model)

    def run(self, batches: list[torch.Tensor]) -> list[ModuleReport]:
        """Calibrate and quantize block by block, then RTN and swap what is left; the reports in swap order."""
        opts, onload = self.options, self.options.onload
        callbacks = BlockCallbacks(after_capture=onload.capture_done if onload is not None else None,
                                   before_block=self.before_block, after_block=self.after_block)
        resume = _GPTQResume(self, opts.store) if opts.store is not None else None
        calibrate_blocks_(self.model, batches, self.keep, self.solve, self.args.true_sequential,
                          options=BlockRunOptions(progress=opts.progress, resume=resume, store=opts.hidden,
                                                  dist=self.dist, callbacks=callbacks,
                                                  cache_outputs=opts.cache_outputs,
                                                  asymmetric=self.args.gptaq or self.reconstruct_steps > 0,
                                                  refine=self.refine if self.reconstruct_steps > 0 else None))
        if onload is not None:
            onload.load_rest()
        for name, module in quantizable_modules(self.model, self.keep).items():
            if name not in self.reports:
                self.fallback(name, module, note="outside the repeated blocks")
        self.swap(None)
        return [self.reports[n] for n in self.order]

    def scheme_of(self, name: str) -> Scheme:
        return (self.schemes or {}).get(name, self.scheme)

    # ---- recording results

    def fallback(self, name: str, module: nn.Module, note: str = "not called during calibration") -> None:
        """Round ``module`` to nearest and record it."""
        scheme = self.scheme_of(name)
        self.results[name] = (module, *_rtn(module, scheme))
        self.reports[name] = _report(name, "rtn", scheme, note=note)

    def fallback_in_block(self, name: str, module: nn.Module, note: str) -> None:
        """``fallback`` inside a block being calibrated: later stages read the rounded weight."""
        self.fallback(name, module, note=note)
        stored = self.results[name][1:]
        set_float_weight_(module, self.scheme_of(name).format.dequantize(stored, in_out_features(module)[0]))

    def accept(self, name: str, module: nn.Module, res: GPTQResult | None, scheme: Scheme) -> None:
        """Record one module's solve (or its RTN fallback) and give later stages its dequantized weight."""
        if res is None:
            logger.warning("%s: Hessian not positive definite even at maximum damping; using RTN", name)
            self.fallback_in_block(name, module, note="Hessian not positive definite at any damping")
            return
        if res.retries:
            logger.warning("%s: Hessian needed damping %.4g (%d retries)", name, res.damp, res.retries)
        set_float_weight_(module, res.dequantized())
        self.results[name] = (module, *res.stored)
        if self.reconstruct_steps > 0 and res.format.reconstructable:
            self.pre[name] = res.pre / res["scales"][:, res["g_idx"].long()]
        self.reports[name] = _report(name, "gptq", scheme, loss=res.loss, damp=res.damp, damp_retries=res.retries)

    def restore(self, modules: dict[str, tuple[tuple[torch.Tensor, ...], ModuleReport]]) -> None:
        """Record modules of a finished block restored from a resume store: name -> ``(stored tensors, report)``, in
        the order they were saved. They are swapped before the next block runs."""
        for name, (tensors, report) in modules.items():
            self.results[name] = (self.model.get_submodule(name), *tensors)
            self.reports[name] = report

    def block_results(self, block_name: str) -> tuple[dict[str, tuple], dict[str, ModuleReport]]:
        """The pending results (stored tensors) and reports of block ``block_name``'s modules."""
        names = [n for n in self.results if n.startswith(block_name + ".")]
        return {n: self.results[n][1:] for n in names}, {n: self.reports[n] for n in names}

    # ---- calibrate_blocks_'s callbacks

    def solve(self, block_name: str, group, hessian: torch.Tensor, cross: torch.Tensor | None = None) -> None:
        """One GPTQ solve per module on the shared Hessian (its factor computed once per rank that needs it; on CUDA
        with one process, one per format: ``solve_stacked``). With several processes each module has one owner
        (balanced by cost), which solves and broadcasts.
        ``cross``: the group's asymmetric-calibration term, shared like the Hessian; used in a GPTAQ run only (a
        run with block reconstruction alone carries the float stream for its targets, not for the solves)."""
        t0 = time.perf_counter()
        least = max(self.options.expert_min_tokens, 1)
        if group.expert is not None and group.tokens < least:
            for short, module in zip(group.names, group.modules):
                self.fallback_in_block(f"{block_name}.{short}", module, note=(
                    f"expert fallback: {group.tokens} routed tokens (expert_min_tokens {least}); rounded to nearest"))
            return
        units = []
        for short, module in zip(group.names, group.modules):
            name = f"{block_name}.{short}"
            scheme = self.scheme_of(name)
            if name in (self.schemes or {}) and scheme.method == "rtn":
                self.fallback_in_block(name, module, note="method rtn (override)")
            else:
                units.append((name, module, scheme))
        factor: list = []  # prepared on first use: [HessianFactor or None]
        args = self.args
        cross = cross if args.gptaq else None

        def solve(w: torch.Tensor, fmt, scale_dtype) -> GPTQResult | None:
            if not factor:
                factor.append(prepare_hessian(hessian, act_order=args.desc_act, damp_percent=args.damp_percent))
            if factor[0] is None:
                return None
            return gptq_solve(w, factor[0], fmt, args, scale_dtype=scale_dtype, cross=cross)

        if hessian.device.type == "cuda" and not self.dist.active:
            results = solve_stacked([(float_weight(m), s.format, storage_dtype(m)) for _, m, s in units], solve)
        else:
            def solve_rows(i: int, r0: int, r1: int) -> GPTQResult | None:
                _, module, scheme = units[i]
                return solve(float_weight(module)[r0:r1].float(), scheme.format, storage_dtype(module))
            results = solve_shared(self.dist, [(m, s.format) for _, m, s in units], solve_rows, hessian.device,
                                   with_pre=self.reconstruct_steps > 0)
        for (name, module, scheme), res in zip(units, results):
            self.accept(name, module, res, scheme)
        timings = self.options.timings
        if timings is not None:
            timings["solve_seconds"] = timings.get("solve_seconds", 0.0) + time.perf_counter() - t0

    def refine(self, block_name: str, block: nn.Module, inputs, targets) -> None:
        """Block reconstruction (``hfquant.quantize.reconstruct``) of the block's GPTQ-solved modules (not an MoE's
        routed experts); their stored codes and scales and their weights are replaced when it lowers the block's
        output error."""
        names = [n for n in self.pre if n.startswith(block_name + ".")]
        units = []
        for name in names:
            module, codes, scales, zeros, g_idx = self.results[name]
            if isinstance(module, ExpertLinear):  # routed experts keep GPTQ's result (their weights are views)
                del self.pre[name]
                continue
            g = g_idx.long()
            units.append(RoundedWeight(name[len(block_name) + 1:], self.pre.pop(name), zeros.float()[:, g], scales.float(),
                                       g, 2 ** self.scheme_of(name).bits - 1, module.weight.dtype,
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
            _swap(self.model, name, module, tuple(tensors), self.scheme_of(name))
            self.order.append(name)

    def before_block(self, index: int) -> None:
        self.swap(None)  # blocks restored by ``resume`` (the only results pending here)
        if self.options.onload is not None:
            self.options.onload.load_block(index)

    def after_block(self, index: int, block_name: str) -> None:
        # Modules of this block the calibration never reached: RTN while their float weights are here.
        for n, m in quantizable_modules(self.blocks[index], self.keep, prefix=block_name).items():
            if f"{block_name}.{n}" not in self.results and f"{block_name}.{n}" not in self.reports:
                self.fallback(f"{block_name}.{n}", m)
        self.swap(block_name)
        fuse_experts_(self.blocks[index])  # the experts' float weights go as soon as all are quantized
        if self.options.onload is not None:
            self.options.onload.block_done(index)


class _GPTQResume:
    """``BlockResume`` for a ``_GPTQRun`` over a ``ResumeStore``: a finished block's state is its modules' stored
    tensors, by their format's field names (``ResumeStore.save_modules``), and reports (as dicts).

    It holds none of that state: restored modules are handed to ``run.restore``, and what a finished block
    saves is asked of ``run.block_results``."""

    def __init__(self, run: _GPTQRun, store):
        self.run, self.store = run, store

    def start(self):
        done = self.store.blocks_done
        for i in range(done):
            modules, meta = self.store.load_modules(i)
            self.run.restore({name: (tuple(modules[name][f] for f in self.run.scheme_of(name).format.fields),
                                     ModuleReport(**report)) for name, report in meta.items()})
        return done, (self.store.load_hidden() if done else None)

    def done(self, index: int, block_name: str, outputs: list[torch.Tensor]) -> None:
        results, reports = self.run.block_results(block_name)
        by_field = {n: dict(zip(self.run.scheme_of(n).format.fields, ts, strict=True)) for n, ts in results.items()}
        self.store.save_modules(index, by_field, {n: asdict(r) for n, r in reports.items()}, outputs)


def reports_as_dicts(reports: list[ModuleReport]) -> list[dict]:
    return [asdict(r) for r in reports]
