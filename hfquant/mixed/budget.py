"""Budget mode (``bits: "auto"``): pick each module's scheme from the candidates to meet a budget.

* ``target_avg_bits``: minimise the summed sensitivity (GPTQ proxy loss relative to the module's output
  energy, ``hfquant.mixed.sensitivity``; see ``losses_of``) subject
  to ``sum stored_bits <= target * sum in*out`` over the quantized modules (``hfquant.mixed.allocation``). Stored
  bits are what the checkpoint holds per module: codes, scales (model dtype), uint8 zeros and int32 g_idx
  (``hfquant.core.schemes.stored_bits``), so the budget is met by the saved tensors, not only by the codes.
* ``max_ppl_increase``: the smallest average-bits target whose allocation keeps the perplexity on held-out
  WikiText-2 *valid* windows within ``(1 + max_ppl_increase)`` of the float model's. Each trial is a
  round-to-nearest fake-quantized copy of the weights at that allocation (seconds, no calibration); the
  target is found by bisection, then the run quantizes the chosen allocation with GPTQ. RTN is the cheap
  proxy: GPTQ's error is normally lower, so the final model normally has margin; its valid perplexity is
  measured and reported too. The valid windows are the *last* ones of the bundled valid text; calibration
  windows are sampled from the same text, so they may overlap (never the test split, which reports use).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from hfquant.calibration.data import BUNDLED_CALIBRATION, evaluation_token_ids
from hfquant.nn.graph import float_weight, set_float_weight_
from hfquant.core.errors import ConfigError
from hfquant.core.grids import dequantize_grouped, rtn_quantize
from hfquant.core.schemes import stored_bits
from hfquant.eval.perplexity import perplexity
from hfquant.mixed.allocation import allocate

logger = logging.getLogger(__name__)


def candidate_costs(table: dict, scale_bits: int) -> tuple[list[str], list[list[int]], int]:
    """(module names, stored bits per candidate per module, total weights)."""
    names = list(table["modules"])
    costs = [[stored_bits(m["in"], m["out"], c["bits"], c["group_size"], scale_bits) for c in table["candidates"]]
             for m in table["modules"].values()]
    weights = sum(m["in"] * m["out"] for m in table["modules"].values())
    return names, costs, weights


def has_fisher(table: dict) -> bool:
    """Whether the sensitivity table holds the Fisher-weighted loss estimates (``fisher_gptq``) of every module."""
    return bool(table["modules"]) and all("fisher_gptq" in m for m in table["modules"].values())


def losses_of(table: dict) -> list[list[float]]:
    """Per module per candidate: the quantity the allocation minimises.

    * With the ``fisher_gptq`` estimates (``hfquant.mixed.sensitivity``): the second-order estimate of the increase
      of the model's next-token loss when only that module is quantized with GPTQ at that candidate. It
      weights each output channel's error by how much the loss reacts to it, so it is comparable across
      module kinds and depths.
    * Without them: the GPTQ proxy loss relative to the module's output energy, ``tr(E H E^T) / tr(W H W^T)``.
      Why relative: absolute losses grow with the residual stream's size, which grows with depth, so summing
      them sent the first blocks to 2 bits; on SmolLM2-135M at 3.5 bits a round-to-nearest trial of that
      allocation had perplexity 8619 on WikiText-2 valid windows against 850 for the relative one (a third
      variant, losses divided by the block's o_proj + down_proj output energy, 11341); see BENCHMARKS.md.
    """
    if has_fisher(table):
        return [list(m["fisher_gptq"]) for m in table["modules"].values()]
    return [[x / (m["energy"] or 1.0) for x in m["gptq"]] for m in table["modules"].values()]


def _units(names: list[str], table: dict) -> dict[str, list[int]]:
    """Allocation units -> indices of their modules: a module on its own, or every expert of one projection of an
    MoE experts module (``unit`` in the table: they are stored stacked, so they share one scheme)."""
    units: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        units.setdefault(table["modules"][n].get("unit", n), []).append(i)
    return units


def allocate_bits(table: dict, target_avg_bits: float, scale_bits: int = 32) -> tuple[dict[str, dict], float]:
    """Allocation ``{module: {bits, group_size}}`` with stored average bits <= ``target_avg_bits``, and that average.
    The experts of one MoE projection are one unit: their losses and costs add up, and they get one scheme."""
    names, costs, weights = candidate_costs(table, scale_bits)
    budget = math.floor(target_avg_bits * weights)

    lo = sum(min(c) for c in costs) / weights
    if budget < sum(min(c) for c in costs):
        raise ConfigError(f"quantization.target_avg_bits: {target_avg_bits} is below {lo:.4f}, the smallest average "
                          "the candidates allow (counting scales, zeros and g_idx); raise it or add cheaper candidates")
    units, losses = _units(names, table), losses_of(table)
    unit_losses = [[sum(losses[i][j] for i in members) for j in range(len(table["candidates"]))]
                   for members in units.values()]
    unit_costs = [[sum(costs[i][j] for i in members) for j in range(len(table["candidates"]))]
                  for members in units.values()]
    pick = allocate(unit_losses, unit_costs, budget)
    chosen = {names[i]: dict(table["candidates"][j]) for members, j in zip(units.values(), pick) for i in members}
    avg = sum(unit_costs[u][j] for u, j in enumerate(pick)) / weights
    return {n: chosen[n] for n in names}, avg


def average_range(table: dict, scale_bits: int = 32) -> tuple[float, float]:
    """The smallest and largest average stored bits the candidates allow."""
    _, costs, weights = candidate_costs(table, scale_bits)
    return sum(min(c) for c in costs) / weights, sum(max(c) for c in costs) / weights


@dataclass(frozen=True)
class TrialGrid:
    """The integer grid of ``search_ppl``'s round-to-nearest trials (the run's ``sym`` and ``observer``; bits and
    group size come from each module's candidate) and ``scale_bits``, the bits of one stored scale (the model's
    float dtype), which the stored-bits budget counts."""

    sym: bool
    observer: str
    scale_bits: int = 32


def _fake_quantize_(model: nn.Module, allocation: dict[str, dict], grid: TrialGrid) -> dict[str, torch.Tensor]:
    """Replace each allocated module's weight by its RTN dequantized weight; returns the originals."""
    saved = {}
    for name, s in allocation.items():
        m = model.get_submodule(name)
        w = float_weight(m)
        saved[name] = m.weight.detach().clone()
        set_float_weight_(m, dequantize_grouped(*rtn_quantize(w.float(), s["bits"], s["group_size"], grid.sym,
                                                              grid.observer)))
    return saved


def _restore_(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, w in saved.items():
        model.get_submodule(name).weight.data.copy_(w)


def search_ppl(model: nn.Module, table: dict, ids: torch.Tensor, max_increase: float, *, grid: TrialGrid,
               seq_len: int = 512, windows: int = 8, steps: int = 7) -> dict:
    """Bisection on the average-bits target for ``max_ppl_increase`` (see the module docstring); each trial
    rounds the weights to ``grid``.

    Returns ``{"allocation", "target_avg_bits", "avg_bits", "ppl_float", "ppl_limit", "trials": [...]}``.
    """
    def ppl() -> float:
        return perplexity(model, None, ids, seq_len=seq_len, max_windows=windows)

    base = ppl()
    limit = base * (1 + max_increase)
    lo, hi = average_range(table, grid.scale_bits)
    trials = []

    def trial(target: float):
        allocation, avg = allocate_bits(table, target, grid.scale_bits)
        saved = _fake_quantize_(model, allocation, grid)
        try:
            value = ppl()
        finally:
            _restore_(model, saved)
        trials.append({"target_avg_bits": target, "avg_bits": avg, "ppl_rtn_trial": value})
        logger.info("budget search: target %.4f bits -> RTN trial perplexity %.3f (limit %.3f)", target, value, limit)
        return allocation, avg, value

    best = trial(hi)
    best_target = hi
    if best[2] > limit:
        logger.warning("max_ppl_increase: even the largest candidates give %.3f > %.3f on the RTN trial; using them",
                       best[2], limit)
    else:
        a, b = lo, hi
        for _ in range(steps):
            mid = (a + b) / 2
            found = trial(mid)
            if found[2] <= limit:
                best, best_target, b = found, mid, mid
            else:
                a = mid
    return {"allocation": best[0], "target_avg_bits": best_target, "avg_bits": best[1], "ppl_float": base,
            "ppl_limit": limit, "trials": trials}


def valid_ids(tokenizer, seq_len: int, windows: int) -> torch.Tensor:
    """The last ``windows`` windows of ``seq_len`` tokens of the bundled WikiText-2 valid text (each BOS and the
    next ``seq_len - 1`` tokens where the tokenizer puts BOS in front of every text)."""
    ids = evaluation_token_ids(BUNDLED_CALIBRATION.read_text(encoding="utf-8"), tokenizer, seq_len)
    return ids[-windows * seq_len:]
