"""Model-level W8A8: SmoothQuant smoothing, int8 weights (RTN or GPTQ), block by block.

Per block: (1) one float forward over the calibration batches collects, for every group of Linears
reading one tensor, the per-channel abs-max of that input (and its Hessian when weights use GPTQ); its outputs are the next block's inputs, so the statistics are
those of the float model, as in the SmoothQuant reference, and the whole run costs one forward pass;
(2) each group fed by a norm is smoothed, with a fixed alpha or the alpha of ``ALPHA_GRID`` whose W8A8
error at the block's output is smallest (``_BlockCheck.w8a8_error``: the block in float32 on the first
calibration batch, that group's Linears simulated in W8A8), and the fold is kept only if the block's output is
unchanged; (3) weights become int8 per channel.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hfquant.calibration.distributed import Dist, solve_shared
from hfquant.nn.graph import find_blocks, float_weight, quantizable_modules, set_float_weight_, set_submodule
from hfquant.calibration.blocks import (add_idle_experts, BlockInputs, call_block, capture_block_inputs,
                                        discover_groups, HessianStat)
from hfquant.quantize.smoothing import find_producers, fold_, missing_known_groups, relative_change
from hfquant.core.gptq import gptq_solve, GPTQResult, HessianFactor, prepare_hessian, SolveArgs
from hfquant.core.int_grid import IntGrid
from hfquant.core.smoothquant import (ALPHA_GRID, column_absmax, QMAX, quantize_activation_int8, quantize_weight_int8,
                                      smoothing_scales)
from hfquant.nn.w8a8 import QuantLinearW8A8

logger = logging.getLogger(__name__)
# SmoothQuant's GPTQ weights: int8 codes, one symmetric scale per output channel (stored as ``code - 128``).
INT8_PER_CHANNEL = IntGrid(8, -1, True, "minmax")
EXACT_TOL = 1e-4      # relative change of the block output that still counts as "unchanged"


class _GroupStats:
    """Per-channel abs-max (and Hessian) of one group's input, in float32 on the input's device (created at the
    first batch, so they follow wherever the block runs)."""

    def __init__(self, cols: int, hessian: bool, dist: Dist):
        self.cols, self.dist, self.want_hessian = cols, dist, hessian
        self.absmax: torch.Tensor | None = None
        self.hessian: HessianStat | None = None

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if self.absmax is None:
            self.absmax = torch.zeros(self.cols, device=x2.device)
            if self.want_hessian:
                self.hessian = HessianStat(torch.zeros(self.cols, self.cols, device=x2.device), dist=self.dist)
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        if self.hessian is not None:
            self.hessian.add(x2)

    def reduce(self, dist: Dist, device) -> None:
        """Totals over the calibration processes: max of maxima, the Hessian chain."""
        if self.absmax is None:  # no batch reached this group (cannot happen with a non-empty share)
            self.absmax = torch.zeros(self.cols, device=device)
            if self.want_hessian:
                self.hessian = HessianStat(torch.zeros(self.cols, self.cols, device=device), dist=self.dist)
        if not dist.active:
            return
        self.absmax = dist.max(self.absmax, device)
        if self.hessian is not None:
            self.hessian.reduce()


class _BlockCheck:
    """A float32 copy of a block and its output on the first calibration batch: what the alpha search and the
    fold check measure against.

    ``w8a8_error``: the block output's relative change when ``s`` is folded and one group's Linears run W8A8 (the
    alpha search). ``fold``: whether folding ``s`` into a norm leaves the block's output unchanged. The copy is
    float32 whatever the model's dtype, so the tolerance (``EXACT_TOL``) measures whether the norm feeds only
    these Linears, not a bf16/fp16 model's rounding of the folded weights. Accepted folds stay in the copy (each
    group is searched and checked on top of the earlier ones); everything else is restored exactly. The model's
    own block is not touched here.
    """

    def __init__(self, block: nn.Module, inp: BlockInputs):
        self.block = copy.deepcopy(block).float()
        self.inp = BlockInputs(_to_float32(inp.args), _to_float32(inp.kwargs))
        with torch.no_grad():
            self.ref = call_block(self.block, self.inp)
        self.names = {id(m): n for n, m in block.named_modules()}

    def _folded(self, g, s: torch.Tensor):
        """Fold ``s`` into the copy's ``g.norm`` and Linears; return (norm, Linears, their tensors before)."""
        norm = self.block.get_submodule(g.norm_name)
        linears = [self.block.get_submodule(self.names[id(m)]) for m in g.modules]
        saved = [t.detach().clone() for t in _fold_tensors(norm, linears)]
        fold_(norm, linears, s)
        return norm, linears, saved

    def fold(self, g, s: torch.Tensor) -> float:
        """Fold ``s`` into the copy's ``g.norm`` and Linears; return the relative change of the block output."""
        norm, linears, saved = self._folded(g, s)
        with torch.no_grad():
            change = relative_change(call_block(self.block, self.inp), self.ref)
        if change > EXACT_TOL:
            _restore(norm, linears, saved)
        return change

    def w8a8_error(self, g, s: torch.Tensor) -> float:
        """The relative change of the block output when ``s`` is folded and ``g``'s Linears run W8A8 (int8 weights
        per channel by round-to-nearest, int8 activations per token, simulated in float32); the copy is restored
        after. The other Linears stay float: each group's alpha is chosen for its own error, as it reaches the
        block's output (through attention's softmax, the MLP's gate, the residual)."""
        norm, linears, saved = self._folded(g, s)
        for m in linears:  # [out, in] orientation, also for GPT-2's Conv1D
            q, scale = quantize_weight_int8(float_weight(m))
            set_float_weight_(m, q.float() * scale[:, None])
        hooks = [m.register_forward_pre_hook(_fake_quant_input) for m in linears]
        try:
            with torch.no_grad():
                return relative_change(call_block(self.block, self.inp), self.ref)
        finally:
            for h in hooks:
                h.remove()
            _restore(norm, linears, saved)


def _restore(norm: nn.Module, linears: list[nn.Module], saved: list[torch.Tensor]) -> None:
    for t, old in zip(_fold_tensors(norm, linears), saved):
        t.data.copy_(old)


def _search_alpha(check: _BlockCheck | None, g, act_absmax: torch.Tensor, w_max: torch.Tensor, dist: Dist,
                  device) -> float:
    """The alpha of ``ALPHA_GRID`` whose smoothed W8A8 group changes the block output least (``w8a8_error``), on
    rank 0 (which holds the first batch), broadcast to the other ranks. ``w_max``: the group's column abs-max."""
    chosen = -1.0
    if check is not None:
        errors = {a: check.w8a8_error(g, smoothing_scales(act_absmax, w_max, a).to(g.norm.weight.device))
                  for a in ALPHA_GRID}
        chosen = min(errors, key=errors.get)
    return dist.from_main(chosen, device) if dist.active else chosen


def _fake_quant_input(_module, args):
    """Forward pre-hook: the Linear's input rounded to per-token int8, as a W8A8 module does at run time."""
    q, scale = quantize_activation_int8(args[0])
    return ((q.float() * scale).to(args[0].dtype), *args[1:])


def _smoothed_hessian(st: _GroupStats, s: torch.Tensor | None) -> torch.Tensor:
    """The group's input Hessian, of the smoothed input ``X / s`` when smoothed."""
    h = st.hessian.normalized()
    if s is None:
        return h
    inv = 1.0 / s.float()
    return h * inv[:, None] * inv[None, :]


def _fold_norm_(norm: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """Divide the model's norm by ``s`` in its own dtype; return the scale that division really applied.

    In bf16/fp16 ``weight / s`` is rounded, so the Linears must be multiplied by ``old / new`` (computed in
    float32) rather than by ``s`` for the folded pair to compute what the unfolded one did. float32 keeps ``s``.
    """
    if norm.weight.dtype == torch.float32:
        fold_(norm, [], s)
        return s
    old = norm.weight.detach().float().clone()
    fold_(norm, [], s)
    new = norm.weight.detach().float()
    return torch.where(new != 0, old / new, s.float())


def _fold_tensors(norm: nn.Module, linears: list[nn.Module]) -> list[torch.Tensor]:
    ts = [norm.weight] + ([norm.bias] if getattr(norm, "bias", None) is not None else [])
    return ts + [m.weight for m in linears]


def _to_float32(value):
    """``value`` (tensors, tuples, lists, dicts of them) with floating tensors cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class SmoothQuantSettings:
    """What a W8A8 run computes: ``alpha`` (the migration strength: a number in [0, 1], ``"auto"`` for the search
    over ``ALPHA_GRID``, or ``None``: no smoothing), ``weight_method`` (int8 weights by ``"rtn"`` per channel or by
    ``"gptq"``), ``static_activations`` (one per-tensor input scale from calibration; else per token at run time),
    and the GPTQ solver's ``damp_percent`` and ``block_size`` (``weight_method="gptq"``)."""

    alpha: float | str | None = "auto"
    weight_method: str = "rtn"
    static_activations: bool = False
    damp_percent: float = 0.01
    block_size: int = 128

    @classmethod
    def from_config(cls, config) -> SmoothQuantSettings:
        """From an ``HFQuantConfig``: its ``smoothquant`` section and its ``gptq`` section's solver fields."""
        sq, solver = config.smoothquant, config.gptq
        return cls(alpha=sq.alpha, weight_method=sq.weight_method, static_activations=sq.activation_scheme == "static",
                   damp_percent=solver.damp_percent, block_size=solver.block_size)


@dataclass(frozen=True)
class W8A8RunOptions:
    """How a W8A8 run executes (not what it computes): ``progress`` bar; ``dist``
    (``hfquant.calibration.distributed.Dist``): the batches are this process's share, the statistics are reduced
    exactly over the processes; ``onload`` (``hfquant.calibration.onload.LayerLoader``): load each block when its
    turn comes."""

    progress: bool = True
    dist: Dist | None = None
    onload: object = None


def quantize_w8a8_(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool],
                   settings: SmoothQuantSettings, options: W8A8RunOptions | None = None) -> list[dict]:
    """Smooth and quantize every selected Linear to W8A8 in place. Returns one report dict per Linear.

    With several processes (``options.dist``), the alpha search and the fold checks run on rank 0's first batch,
    which is batch 0, and rank 0's choices are broadcast.
    """
    options = options or W8A8RunOptions()
    dist, onload = options.dist or Dist(), options.onload
    blocks_name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], batches)
    if onload is not None:
        onload.capture_done()
    reports: list[dict] = []
    it = range(len(blocks))
    if options.progress:
        it = tqdm(it, desc="smoothing + W8A8", unit="block")
    for i in it:
        block, prefix = blocks[i], f"{blocks_name}.{i}"
        if onload is not None:
            onload.load_block(i)
        modules = quantizable_modules(block, keep, prefix=prefix)
        if modules:
            block_reports, outputs = _quantize_block(block, prefix, modules, inputs, settings, dist)
            reports.extend(block_reports)
            if settings.alpha is not None:
                _check_known_groups(getattr(getattr(model, "config", None), "model_type", None), prefix, block_reports)
        else:
            with torch.no_grad():
                outputs = [call_block(block, inp) for inp in inputs]
        inputs = [inp.with_hidden(out) for inp, out in zip(inputs, outputs)]
    if onload is not None:
        onload.load_rest()
    # Linears outside the repeated blocks: W8A8 without smoothing or calibration (dynamic activations).
    for name, module in quantizable_modules(model, keep).items():
        if name.startswith(blocks_name + "."):
            continue
        set_submodule(model, name, QuantLinearW8A8.from_float(module, float_weight(module).float()))
        reports.append({"name": name, "smoothed": False, "alpha": None, "note": "outside the repeated blocks"})
    return reports


def _check_known_groups(model_type, prefix: str, block_reports: list[dict]) -> None:
    pairs: dict[str, list[str]] = {}
    for r in block_reports:
        if r["smoothed"]:
            pairs.setdefault(r["smoothed_by"], []).append(r["name"][len(prefix) + 1:])
    for miss in missing_known_groups(model_type, [(n, tuple(ls)) for n, ls in pairs.items()]):
        logger.warning("%s: the known %s pair %s was not smoothed (see the report's notes)", prefix, model_type, miss)


def _quantize_block(block, prefix: str, modules, inputs: list[BlockInputs], settings: SmoothQuantSettings,
                    dist: Dist):
    """Smooth and quantize the Linears ``modules`` of ``block`` (the module docstring's steps); returns their
    reports and the float block's outputs (the next block's inputs)."""
    step = _BlockPass(block, prefix, settings, dist)
    outputs = step.collect(modules, inputs)
    # Decide every group's smoothing first (each fold checked against the float block), then quantize.
    step.decide(inputs[0])
    units = step.smoothed_weights()
    solved = step.solve(units) if settings.weight_method == "gptq" else {}
    return step.replace(units, solved), outputs


class _BlockPass:
    """One block's W8A8 pass, step by step: ``collect`` (the groups of Linears reading one tensor and their input
    statistics, over one float forward), ``decide`` (each group's smoothing), ``smoothed_weights``, ``solve`` (GPTQ
    weights) and ``replace`` (the ``QuantLinearW8A8`` modules)."""

    def __init__(self, block: nn.Module, prefix: str, settings: SmoothQuantSettings, dist: Dist):
        self.block, self.prefix, self.settings, self.dist = block, prefix, settings, dist
        self.groups: list = []
        self.stats: list[_GroupStats] = []
        self.decisions: list[tuple[torch.Tensor | None, float | None, str]] = []  # (s, chosen alpha, note) per group
        self.device = None

    def collect(self, modules, inputs: list[BlockInputs]) -> list:
        """Find the groups, run the float block over every batch with their statistics hooked; return its outputs."""
        block = self.block
        groups, _ = add_idle_experts(*discover_groups(block, modules, inputs), modules)
        self.groups = find_producers(block, groups, lambda: call_block(block, inputs[0]))
        handles = []
        for g in self.groups:
            cols = float_weight(g.modules[0]).shape[1]
            st = _GroupStats(cols, self.settings.weight_method == "gptq", self.dist)
            self.stats.append(st)
            handles.append(g.modules[0].register_forward_pre_hook(lambda _m, a, _st=st: _st.add(a[0])))
        try:
            with torch.no_grad():
                outputs = [call_block(block, inp) for inp in inputs]
        finally:
            for h in handles:
                h.remove()
        self.device = next(block.parameters()).device
        for st in self.stats:
            st.reduce(self.dist, self.device)
        return outputs

    def decide(self, first: BlockInputs) -> None:
        """Each group's ``(s, chosen alpha, note)``; accepted folds are applied to the model's norms."""
        alpha = self.settings.alpha
        check = _BlockCheck(self.block, first) if self.dist.is_main and alpha is not None else None
        self.decisions = [self._decide(g, st, check) for g, st in zip(self.groups, self.stats)]

    def _decide(self, g, st: _GroupStats, check: _BlockCheck | None):
        alpha, dist, device = self.settings.alpha, self.dist, self.device
        if alpha is None:
            return None, None, "smoothing off"
        if g.norm is None:
            return None, None, ("input does not come from a norm in this block (attention output, activation, or "
                                "block input)")
        w_max = column_absmax([float_weight(m).float() for m in g.modules])
        chosen = float(alpha) if alpha != "auto" else _search_alpha(check, g, st.absmax, w_max, dist, device)
        s = smoothing_scales(st.absmax, w_max, chosen).to(g.norm.weight.device)
        change = check.fold(g, s) if check is not None else 0.0  # batch 0 lives on rank 0
        if dist.active:
            change = dist.from_main(change, device)
        if change > EXACT_TOL:
            return None, None, (f"folding into {g.norm_name} changes the block output ({change:.1e}): "
                                "its output feeds more than these Linears")
        return _fold_norm_(g.norm, s), chosen, ""  # the Linears are quantized from w * s below

    def smoothed_weights(self) -> list[tuple]:
        """``(group index, name, module, smoothed float32 weight)`` per Linear of the block."""
        units = []
        for k, (g, (s, _, _)) in enumerate(zip(self.groups, self.decisions)):
            for name, m in zip(g.names, g.modules):
                # Not rounded to a bf16/fp16 model's dtype before the int8 rounding.
                w = float_weight(m).float() * s.float()[None, :] if s is not None else float_weight(m).float()
                units.append((k, name, m, w))
        return units

    def solve(self, units: list[tuple]) -> dict[str, GPTQResult | None]:
        """Each Linear's GPTQ solve (``None`` where the Hessian cannot be factored). Every solve of the block is
        independent (the statistics are the float block's), so with several processes they are shared out
        (``solve_shared``: row slabs, each with one owner)."""
        factors: dict[int, HessianFactor | None] = {}
        damp_percent, block_size = self.settings.damp_percent, self.settings.block_size

        def solve_rows(i: int, r0: int, r1: int) -> GPTQResult | None:
            k, _, _, w = units[i]
            if k not in factors:
                factors[k] = prepare_hessian(_smoothed_hessian(self.stats[k], self.decisions[k][0]),
                                             damp_percent=damp_percent)
            if factors[k] is None:
                return None
            return gptq_solve(w[r0:r1], factors[k], INT8_PER_CHANNEL, SolveArgs(block_size=block_size))

        results = solve_shared(self.dist, [(m, INT8_PER_CHANNEL) for _, _, m, _ in units], solve_rows, self.device)
        return {name: res for (_, name, _, _), res in zip(units, results)}

    def replace(self, units: list[tuple], solved: dict[str, GPTQResult | None]) -> list[dict]:
        """Put a ``QuantLinearW8A8`` in place of each Linear; return their reports."""
        reports = []
        for k, name, m, w in units:
            g, st, (s, chosen, note) = self.groups[k], self.stats[k], self.decisions[k]
            smoothed = s is not None
            input_scale = (float((st.absmax / s if smoothed else st.absmax).max()) / QMAX
                           if self.settings.static_activations else None)
            res = solved.get(name)
            codes, scales = (((res["codes"] - 128).to(torch.int8), res["scales"][:, 0]) if res is not None
                             else (None, None))
            set_submodule(self.block, name, QuantLinearW8A8.from_float(m, w, input_scale, codes, scales))
            reports.append({"name": f"{self.prefix}.{name}", "smoothed": smoothed, "alpha": chosen,
                            "smoothed_by": g.norm_name if smoothed else None,
                            "weights": self.settings.weight_method if codes is not None else "rtn", "note": note})
        return reports
