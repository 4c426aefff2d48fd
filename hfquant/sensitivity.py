"""Per-module sensitivity: how much output error each module alone adds at each candidate scheme.

One calibration pass runs the *float* model block by block (``calibrate_blocks_`` with a callback that
measures and changes nothing), so every module sees float inputs, as if it were the only one quantized.
For every group of modules sharing an input (Hessian ``H = 2/n sum X^T X``) and every candidate
``(bits, group_size)``, the group's weights are quantized with GPTQ (the run's settings) and with RTN, and
each module's proxy loss is

    L = tr((W - Q) H (W - Q)^T) = 2/n * sum_tokens |x (W - Q)^T|^2,

twice the squared output error per token, summed over the module's outputs. ``energy = tr(W H W^T)`` is
the same for the float weight (the output's own size), so ``L / energy`` is a relative error.

The table is a JSON-able dict::

    {"candidates": [{"bits", "group_size"}, ...],
     "modules": {name: {"in": int, "out": int, "energy": float, "gptq": [L per candidate], "rtn": [...]}},
     "seconds": float}
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from hfquant.algorithms.gptq import gptq_quantize
from hfquant.algorithms.rtn import dequantize_grouped, rtn_quantize
from hfquant.calibration.modules import float_weight, quantizable_modules
from hfquant.calibration.sequential import calibrate_blocks_


def _proxy(err: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ``(E H E^T)_rr``, in float64."""
    e = err.double()
    return ((e @ h.double()) * e).sum(dim=1)


def group_losses(weights: list[torch.Tensor], hessian: torch.Tensor, candidates: list[dict], *, sym: bool,
                 observer: str, act_order: bool, static_groups: bool, damp_percent: float,
                 block_size: int) -> list[dict]:
    """Losses of modules reading one input: per module ``{"energy", "gptq": [...], "rtn": [...]}``."""
    w = torch.cat([x.float() for x in weights], 0)
    bounds = torch.tensor([0] + [x.shape[0] for x in weights]).cumsum(0).tolist()

    def per_module(rows: torch.Tensor) -> list[float]:
        return [float(rows[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]

    out = [{"energy": e, "gptq": [], "rtn": []} for e in per_module(_proxy(w, hessian))]
    for c in candidates:
        rtn = dequantize_grouped(*rtn_quantize(w, c["bits"], c["group_size"], sym, observer))
        res = gptq_quantize(w, hessian, bits=c["bits"], group_size=c["group_size"], sym=sym, act_order=act_order,
                            static_groups=static_groups, damp_percent=damp_percent, block_size=block_size,
                            observer=observer)
        gptq = rtn if res is None else res.dequantized()  # no Hessian factor at any damping: RTN, like the run
        for kind, q in (("gptq", gptq), ("rtn", rtn)):
            for entry, loss in zip(out, per_module(_proxy(w - q, hessian))):
                entry[kind].append(loss)
    return out


def measure_sensitivity(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool],
                        candidates: list[dict], *, sym: bool = True, observer: str = "minmax",
                        act_order: bool = True, static_groups: bool = True, damp_percent: float = 0.01,
                        block_size: int = 128, progress: bool = True) -> dict:
    """The sensitivity table of every quantizable module inside the repeated blocks (weights untouched)."""
    t0 = time.perf_counter()
    modules: dict[str, dict] = {}

    def solve(block_name, group, hessian) -> None:
        weights = [float_weight(m) for m in group.modules]
        found = group_losses(weights, hessian, candidates, sym=sym, observer=observer, act_order=act_order,
                             static_groups=static_groups, damp_percent=damp_percent, block_size=block_size)
        for n, w, entry in zip(group.names, weights, found):
            modules[f"{block_name}.{n}"] = {"in": w.shape[1], "out": w.shape[0], **entry}

    calibrate_blocks_(model, batches, keep, solve, true_sequential=False, progress=progress)
    order = [n for n in quantizable_modules(model, keep) if n in modules]
    return {"candidates": [dict(c) for c in candidates], "modules": {n: modules[n] for n in order},
            "seconds": time.perf_counter() - t0}


def label(candidate: dict) -> str:
    g = "pc" if candidate["group_size"] == -1 else f"g{candidate['group_size']}"
    return f"W{candidate['bits']} {g}"


def to_markdown(table: dict, allocation: dict | None = None) -> str:
    """One row per module: GPTQ proxy loss relative to the output energy at each candidate (and the choice)."""
    cands = table["candidates"]
    head = "| module | " + " | ".join(f"{label(c)} GPTQ | {label(c)} RTN" for c in cands)
    head += " | chosen |" if allocation else " |"
    lines = [
        "Relative proxy loss tr((W-Q) H (W-Q)^T) / tr(W H W^T) per module when only that module is quantized "
        "(float inputs, calibration data).",
        "",
        head,
        "|" + "---|" * (1 + 2 * len(cands) + (1 if allocation else 0)),
    ]
    for name, m in table["modules"].items():
        e = m["energy"] or 1.0
        cells = " | ".join(f"{g / e:.3g} | {r / e:.3g}" for g, r in zip(m["gptq"], m["rtn"]))
        chosen = ""
        if allocation:
            s = allocation.get(name)
            chosen = f" {label(s)} |" if s else " float |"
        lines.append(f"| {name} | {cells} |{chosen}")
    return "\n".join(lines) + "\n"


def plot(table: dict, path, allocation: dict | None = None) -> None:
    """Write a PNG: relative GPTQ proxy loss per module (log scale), one line per candidate, and the
    chosen scheme per module when ``allocation`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["modules"])
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 4.5))
    for j, c in enumerate(table["candidates"]):
        ys = [max(m["gptq"][j] / (m["energy"] or 1.0), 1e-12) for m in table["modules"].values()]
        ax.plot(x, ys, marker=".", linewidth=0.8, label=label(c))
    if allocation:
        ys, xs = [], []
        for i, n in enumerate(names):
            s = allocation.get(n)
            if s is None:
                continue
            j = next(k for k, c in enumerate(table["candidates"])
                     if c["bits"] == s["bits"] and c["group_size"] == s["group_size"])
            xs.append(i)
            ys.append(max(table["modules"][n]["gptq"][j] / (table["modules"][n]["energy"] or 1.0), 1e-12))
        ax.scatter(xs, ys, s=28, facecolors="none", edgecolors="black", label="chosen", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("module (execution order)")
    ax.set_ylabel("relative GPTQ proxy loss")
    ax.set_title("Per-module sensitivity (only that module quantized)")
    step = max(1, len(names) // 30)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([n.split(".", 2)[-1] if n.count(".") >= 2 else n for n in names[::step]],
                       rotation=90, fontsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
