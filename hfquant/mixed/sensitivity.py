"""Per-module sensitivity: how much output error each module alone adds at each candidate scheme.

One calibration pass runs the *float* model block by block (``calibrate_blocks_`` with a callback that
measures and changes nothing), so every module sees float inputs, as if it were the only one quantized.
For every group of modules sharing an input (Hessian ``H = 2/n sum X^T X``) and every candidate
``(bits, group_size)``, the group's weights are quantized with GPTQ (the run's settings) and with RTN, and
each module's proxy loss is

    L = tr((W - Q) H (W - Q)^T) = 2/n * sum_tokens |x (W - Q)^T|^2,

twice the squared output error per token, summed over the module's outputs. ``energy = tr(W H W^T)`` is
the same for the float weight (the output's own size), so ``L / energy`` is a relative error.

The proxy treats every output channel of every module as equally important to the model's loss. With
``fisher`` (the default in ``bits: auto``), a forward + backward pass of the float model over a few
calibration windows first measures, for every output channel ``j`` of every module, ``f_j``, the mean over
tokens of ``(dLoss/dy_j)^2`` (the diagonal of the empirical Fisher information of the next-token loss with
respect to that output). The second-order estimate of the loss increase caused by the output error
``e = (W - Q) x`` is then ``1/2 E[sum_j g_j^2 e_j^2] ~= 1/4 sum_j f_j (E H E^T)_jj`` (gradients and
inputs taken as independent), stored as ``fisher_gptq`` / ``fisher_rtn``: an estimate in nats per token,
comparable across modules and depths, which the budget allocation minimises.

The table is a JSON-able dict::

    {"candidates": [{"bits", "group_size"}, ...],
     "modules": {name: {"in": int, "out": int, "energy": float, "gptq": [L per candidate], "rtn": [...],
                        "fisher_gptq": [estimated loss increase per candidate], "fisher_rtn": [...],
                        "unit": str}},   # unit: an MoE expert's projection, allocated with its siblings
     "fisher_windows": int, "seconds": float}   # the fisher_* keys only when measured
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from hfquant.nn.graph import float_weight, quantizable_modules
from hfquant.calibration.sequential import BlockRunOptions, calibrate_blocks_
from hfquant.config import DEFAULT_CANDIDATES
from hfquant.core.gptq import gptq_quantize, SolveArgs
from hfquant.core.int_grid import IntGrid
from hfquant.mixed.budget import has_fisher, losses_of

# The GPTQ settings a sensitivity pass uses unless given (the config's defaults: act-order with static groups).
SENSITIVITY_ARGS = SolveArgs(desc_act=True, static_groups=True)


def _proxy(err: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ``(E H E^T)_rr``, in float64."""
    e = err.double()
    return ((e @ h.double()) * e).sum(dim=1)


def group_losses(weights: list[torch.Tensor], hessian: torch.Tensor, candidates: list[dict], args=SENSITIVITY_ARGS,
                 grid: IntGrid = IntGrid(), fisher: list[torch.Tensor] | None = None) -> list[dict]:
    """Losses of modules reading one input: per module ``{"energy", "gptq": [...], "rtn": [...]}``, plus
    ``fisher_gptq`` / ``fisher_rtn`` when ``fisher`` (per module, ``f_j`` per output channel) is given. Each
    candidate's ``{bits, group_size}`` replace ``grid``'s (its ``sym`` and ``observer`` are the run's); ``args``: the
    GPTQ settings (``GPTQArgs`` or ``SolveArgs``)."""
    w = torch.cat([x.float() for x in weights], 0)
    bounds = [0, *itertools.accumulate(x.shape[0] for x in weights)]
    scale_dtype = weights[0].dtype  # the grid the run would store (scales in the model's dtype)
    row_weight = None if fisher is None else torch.cat([f.double() for f in fisher]) / 4

    def per_module(rows: torch.Tensor) -> list[float]:
        return [float(rows[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]

    out = [{"energy": e, "gptq": [], "rtn": []} for e in per_module(_proxy(w, hessian))]
    kinds = ("gptq", "rtn") if fisher is None else ("gptq", "rtn", "fisher_gptq", "fisher_rtn")
    for entry in out:
        entry.update({k: [] for k in kinds[2:]})
    for c in candidates:
        fmt = replace(grid, bits=c["bits"], group_size=c["group_size"])
        rtn = fmt.dequantize(fmt.rtn(w, scale_dtype), w.shape[1])
        res = gptq_quantize(w, hessian, fmt, args, scale_dtype=scale_dtype)
        gptq = rtn if res is None else res.dequantized()  # no Hessian factor at any damping: RTN, like the run
        for kind, q in (("gptq", gptq), ("rtn", rtn)):
            rows = _proxy(w - q, hessian)
            for entry, loss in zip(out, per_module(rows)):
                entry[kind].append(loss)
            if row_weight is not None:
                for entry, loss in zip(out, per_module(rows * row_weight)):
                    entry["fisher_" + kind].append(loss)
    return out


def output_fisher(model: nn.Module, batches: list[torch.Tensor], names: list[str], windows: int) -> dict[str, torch.Tensor]:
    """Per module of ``names``: the mean over predicted tokens of ``(dLoss/dy_j)^2`` per output channel ``j``,
    the loss being the float model's next-token cross-entropy summed over the first ``windows`` calibration
    windows (one backward pass per window; weights get no gradients)."""
    rows = [w for b in batches for w in b.split(1)][:windows]
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def watch(name):
        def forward_hook(module, args, output):
            if output.requires_grad:
                def grad_hook(g, name=name):
                    sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0).double()
                    sums[name] = sums[name] + sq if name in sums else sq
                output.register_hook(grad_hook)
        return forward_hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(watch(name)))
    embed = model.get_input_embeddings()
    hooks.append(embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_()))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    tokens = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for ids in rows:
                ids = ids.to(embed.weight.device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="sum")
                loss.backward()
                tokens += ids.shape[1] - 1
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {n: v / max(tokens, 1) for n, v in sums.items()}


def _row_weights(fisher: dict[str, torch.Tensor], name: str, weight: torch.Tensor, device) -> torch.Tensor:
    """The module's ``f_j``; zeros for a module the loss never reached (no gradient: quantizing it costs nothing)."""
    found = fisher.get(name)
    return torch.zeros(weight.shape[0], dtype=torch.float64, device=device) if found is None else found.to(device)


def measure_sensitivity(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool],
                        candidates: list[dict], args=SENSITIVITY_ARGS, grid: IntGrid = IntGrid(), *,
                        progress: bool = True, fisher_windows: int = 0) -> dict:
    """The sensitivity table of every quantizable module inside the repeated blocks (weights untouched), for the
    ``candidates`` on ``grid`` with GPTQ settings ``args`` (as ``group_losses``).

    ``fisher_windows > 0``: also the loss-weighted estimates ``fisher_*`` (see the module docstring),
    from that many calibration windows."""
    t0 = time.perf_counter()
    modules: dict[str, dict] = {}
    fisher = None
    if fisher_windows > 0:
        fisher = output_fisher(model, batches, list(quantizable_modules(model, keep)), fisher_windows)

    def solve(block_name, group, hessian) -> None:
        weights = [float_weight(m) for m in group.modules]
        full = [f"{block_name}.{n}" for n in group.names]
        found = group_losses(weights, hessian, candidates, args, grid,
                             None if fisher is None else [_row_weights(fisher, n, w, hessian.device)
                                                          for n, w in zip(full, weights)])
        for n, w, entry in zip(full, weights, found):
            modules[n] = {"in": w.shape[1], "out": w.shape[0], **entry}
            if group.expert is not None:  # an MoE's experts of one projection are stored stacked: one scheme
                prefix, _, proj = n.rsplit(".", 2)
                modules[n]["unit"] = f"{prefix}.{proj}"

    calibrate_blocks_(model, batches, keep, solve, true_sequential=False, options=BlockRunOptions(progress=progress))
    order = [n for n in quantizable_modules(model, keep) if n in modules]
    table = {"candidates": [dict(c) for c in candidates], "modules": {n: modules[n] for n in order},
             "seconds": time.perf_counter() - t0}
    if fisher is not None:
        table["fisher_windows"] = min(fisher_windows, sum(b.shape[0] for b in batches))
    return table


def measure_for_config(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool], config,
                       progress: bool = True) -> dict:
    """``measure_sensitivity`` with an ``HFQuantConfig``'s candidates and GPTQ settings (what ``bits: auto``
    and ``hfquant sensitivity`` run)."""
    return measure_sensitivity(model, batches, keep, [dict(c) for c in (config.candidates or DEFAULT_CANDIDATES)],
                               config.gptq, IntGrid(sym=config.sym, observer=config.observer), progress=progress,
                               fisher_windows=config.fisher_windows)


def label(candidate: dict) -> str:
    g = "pc" if candidate["group_size"] == -1 else f"g{candidate['group_size']}"
    return f"W{candidate['bits']} {g}"


def to_markdown(table: dict, allocation: dict | None = None) -> str:
    """One row per module: GPTQ and RTN proxy loss relative to the output energy at each candidate, the
    estimated loss increase (GPTQ) when measured, and the choice."""
    cands = table["candidates"]
    fisher = has_fisher(table)
    cols = [f"{label(c)} GPTQ | {label(c)} RTN" + (f" | {label(c)} GPTQ est. loss" if fisher else "") for c in cands]
    head = "| module | " + " | ".join(cols) + (" | chosen |" if allocation else " |")
    intro = ("Relative proxy loss tr((W-Q) H (W-Q)^T) / tr(W H W^T) per module when only that module is quantized "
             "(float inputs, calibration data)")
    if fisher:
        intro += (f"; est. loss: the estimated increase of the next-token loss (nats per token; output errors weighted "
                  f"by squared loss gradients from {table.get('fisher_windows', '?')} windows), which the allocation "
                  "minimises")
    lines = [intro + ".", "", head, "|" + "---|" * (1 + len(cands) * (3 if fisher else 2) + (1 if allocation else 0))]
    for name, m in table["modules"].items():
        e = m["energy"] or 1.0
        cells = " | ".join(f"{g / e:.3g} | {r / e:.3g}" + (f" | {m['fisher_gptq'][j]:.3g}" if fisher else "")
                           for j, (g, r) in enumerate(zip(m["gptq"], m["rtn"])))
        chosen = ""
        if allocation:
            s = allocation.get(name)
            chosen = f" {label(s)} |" if s else " float |"
        lines.append(f"| {name} | {cells} |{chosen}")
    return "\n".join(lines) + "\n"


def plot(table: dict, path, allocation: dict | None = None) -> None:
    """Write a PNG: per module (log scale), one line per candidate, the quantity the allocation minimises
    (estimated loss increase, or relative GPTQ proxy loss without Fisher weights), and the chosen scheme per
    module when ``allocation`` is given."""
    import matplotlib  # optional (the `plot` extra): imported only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    names = list(table["modules"])
    values = losses_of(table)  # what the allocation minimises
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 4.5))
    for j, c in enumerate(table["candidates"]):
        ax.plot(x, [max(v[j], 1e-12) for v in values], marker=".", linewidth=0.8, label=label(c))
    if allocation:
        ys, xs = [], []
        for i, n in enumerate(names):
            s = allocation.get(n)
            if s is None:
                continue
            j = next(k for k, c in enumerate(table["candidates"])
                     if c["bits"] == s["bits"] and c["group_size"] == s["group_size"])
            xs.append(i)
            ys.append(max(values[i][j], 1e-12))
        ax.scatter(xs, ys, s=28, facecolors="none", edgecolors="black", label="chosen", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("module (execution order)")
    ax.set_ylabel("estimated loss increase (nats/token)" if has_fisher(table) else "relative GPTQ proxy loss")
    ax.set_title("Per-module sensitivity (only that module quantized)")
    step = max(1, len(names) // 30)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([n.split(".", 2)[-1] if n.count(".") >= 2 else n for n in names[::step]],
                       rotation=90, fontsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
