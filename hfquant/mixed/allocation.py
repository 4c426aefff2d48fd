"""Choosing one scheme per module under a size budget: a multiple-choice knapsack.

Each module ``i`` has candidate schemes ``j`` with a cost ``c_ij`` (stored bits, an integer) and a loss
``l_ij`` (its sensitivity). ``allocate`` minimises ``sum_i l_i,j(i)`` subject to ``sum_i c_i,j(i) <= budget``
exactly, by dynamic programming over the cost:

    best_i[c] = min_j ( best_{i-1}[c - c_ij] + l_ij )

Costs are counted in units of ``ceil(budget / resolution)`` bits, each cost rounded *up* to whole units, so
any allocation the table finds also meets the budget in exact bits (when rounding leaves no feasible
entry, the units are refined until one fits); with ``budget <= resolution`` the unit
is one bit and the result is the exact optimum. Time and memory are ``O(modules * candidates * resolution)``.
"""

from __future__ import annotations

import math

import torch

from hfquant.core.errors import ConfigError


def allocate(losses: list[list[float]], costs: list[list[int]], budget: int, resolution: int = 200_000) -> list[int]:
    """Index of the chosen candidate per module; raises ``ConfigError`` when no choice fits ``budget``."""
    if len(losses) != len(costs) or any(len(a) != len(b) or not a for a, b in zip(losses, costs)):
        raise ValueError("losses and costs must have one non-empty row per module, of equal lengths")
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise ConfigError(f"budget: the cheapest allocation needs {cheapest} bits but the budget is {budget}; "
                          "raise the target or add cheaper candidates")
    while True:
        unit = max(1, math.ceil(budget / resolution))
        pick = _solve(losses, costs, budget, unit)
        if pick is not None:
            return pick
        resolution *= 4  # rounding the costs up left no room: retry with finer units (unit 1 always fits)


def _solve(losses, costs, budget: int, unit: int) -> list[int] | None:
    size = budget // unit + 1  # a host-side table (device="cpu" below), whatever device the model is on
    inf = float("inf")
    best = torch.full((size,), inf, dtype=torch.float64, device="cpu")
    best[0] = 0.0
    choices = []
    for loss_row, cost_row in zip(losses, costs):
        new = torch.full((size,), inf, dtype=torch.float64, device="cpu")
        pick = torch.full((size,), -1, dtype=torch.int8, device="cpu")
        for j, (loss, cost) in enumerate(zip(loss_row, cost_row)):
            c = -(-int(cost) // unit)
            if c >= size:
                continue
            cand = torch.full((size,), inf, dtype=torch.float64, device="cpu")
            cand[c:] = best[: size - c] + float(loss)
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.tensor(j, dtype=torch.int8, device="cpu"), pick)
        best = new
        choices.append(pick)
    end = int(torch.argmin(best))
    if not math.isfinite(float(best[end])):
        return None
    out = [0] * len(losses)
    c = end
    for i in range(len(losses) - 1, -1, -1):
        j = int(choices[i][c])
        out[i] = j
        c -= -(-int(costs[i][j]) // unit)
    return out
