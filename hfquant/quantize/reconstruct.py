"""Block-wise output reconstruction after GPTQ: learned rounding and group scales, by signed gradient descent.

The idea is Intel's AutoRound (Cheng, Zhang, Shen, Meng, Liu, Chang, Zhang, Lv, Wang, "Optimize Weight Rounding via
Signed Gradient Descent for the Quantization of LLMs", arXiv 2309.05516): once a decoder block is quantized, tune
how each weight was rounded (an offset ``V`` in ``[-0.5, 0.5]`` added before rounding) and each group's range so
the block's outputs match the float model's, with the sign of the gradient as the step (the rounding is a
straight-through estimator). hfquant's version, written from the paper, starts where GPTQ ended instead of from
round-to-nearest:

* each weight's pre-rounding value is GPTQ's updated weight (``GPTQResult.pre``), so ``V = 0`` reproduces GPTQ's
  codes exactly, and the tuning can only move codes GPTQ chose by at most one step;
* the codes stay on GPTQ's grid (``code = clamp(round(pre / s + V) + zero, 0, maxq)``), and each group's scale is
  multiplied by a learned factor ``gamma`` in ``GAMMA_RANGE`` (the stored scale is ``s * gamma``): the same
  storage, the same formats;
* the block reads the quantized model's inputs and its targets are the float block's outputs on the float model's
  inputs (the asymmetric float stream of ``hfquant.calibration.sequential``), as AutoRound does;
* each step uses one whole calibration batch (the batches in a seeded order), the learning rate decays linearly
  from ``1 / steps`` to 0 (so no offset can move more than half a code), and the result is kept only if the
  block's output error over every calibration batch, with the weights as they will be stored, went down.

With several processes, the batch of each step belongs to one rank: it computes the step's signs and broadcasts
them, so every rank applies the same update and the result is that of one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from hfquant.calibration.distributed import Dist
from hfquant.calibration.blocks import BlockInputs
from hfquant.core.grids import dequantize, stored_scale

GAMMA_RANGE = (0.8, 1.2)


@dataclass
class RoundedWeight:
    """One quantized Linear of the block as reconstruction sees it.

    ``pre``: ``[rows, cols]`` pre-rounding values in code units (GPTQ's updated weight divided by its group's scale);
    ``zero``: ``[rows, cols]`` each weight's zero point; ``scales``: ``[rows, G]`` float32 group scales (as stored);
    ``g_idx``: ``[cols]`` group of each column; ``scale_dtype``: the dtype the scales are stored in; ``conv1d``: the
    module keeps its weight as ``[in, out]`` (GPT-2's ``Conv1D``).
    """

    name: str
    pre: torch.Tensor
    zero: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    maxq: int
    weight_dtype: torch.dtype
    scale_dtype: torch.dtype | None = None
    conv1d: bool = False

    def _oriented(self, w: torch.Tensor) -> torch.Tensor:
        w = w.to(self.weight_dtype)
        return w.t() if self.conv1d else w

    def codes(self, v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(self.pre + v) + self.zero, 0, self.maxq)

    def weight(self, v: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """The dequantized weight for offsets ``v`` and scale factors ``gamma``; rounding passes the gradient
        straight through (inside the code range)."""
        x = self.pre + v
        q = torch.clamp(x + (torch.round(x) - x).detach() + self.zero, 0, self.maxq)
        return self._oriented(dequantize(q, (self.scales * gamma)[:, self.g_idx], self.zero))

    def stored(self, v: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes int32, scales float32 as stored, dequantized weight [out, in] float32)`` for the final ``v`` and
        ``gamma``."""
        codes = self.codes(v)
        scales = stored_scale(self.scales * gamma, self.scale_dtype)
        return codes.int(), scales, dequantize(codes, scales[:, self.g_idx], self.zero)


def _owner_of(dist: Dist, total: int) -> list[int]:
    """The rank holding each global batch index (ranks hold consecutive ranges, in rank order)."""
    owners = []
    for r in range(dist.world):
        owners += [r] * len(Dist(r, dist.world).batch_range(total))
    return owners


def _block_error(block, params: dict, inputs: Sequence[BlockInputs], targets: Sequence[torch.Tensor], dist: Dist,
                 device) -> float:
    """Sum over every calibration batch (all ranks, in batch order) of the block's squared output error."""
    local = []
    with torch.no_grad():
        for inp, tgt in zip(inputs, targets):
            local.append((_call(block, params, inp).float() - tgt.float()).pow(2).sum())
    t = torch.stack(local) if local else torch.zeros(0, device=device)
    if dist.active:
        t = dist.gather_rows(t.reshape(-1, 1).double()).reshape(-1)
    return float(t.double().sum())


def _call(block, params: dict, inp: BlockInputs) -> torch.Tensor:
    out = functional_call(block, params, tuple(inp.args), dict(inp.kwargs))
    return out[0] if isinstance(out, (tuple, list)) else out


def reconstruct_block_(block: torch.nn.Module, units: list[RoundedWeight], inputs: Sequence[BlockInputs],
                       targets: Sequence[torch.Tensor], *, steps: int, seed: int = 0,
                       dist: Dist | None = None) -> dict | None:
    """Tune ``units`` (module docstring) for ``steps`` steps. Returns, per unit name, ``(codes, scales, weight)`` as
    they will be stored (the weight ``[out, in]`` float32), and ``"error"``: the block's output error before and
    after; ``None`` when tuning did not lower it (GPTQ's result stands)."""
    dist = dist or Dist()
    total = dist.sum_int(len(inputs), units[0].pre.device) if dist.active else len(inputs)
    owners = _owner_of(dist, total) if dist.active else [0] * total
    first = owners.index(dist.rank) if dist.rank in owners else 0
    v = {u.name: torch.zeros_like(u.pre, requires_grad=True) for u in units}
    gamma = {u.name: torch.ones_like(u.scales, requires_grad=True) for u in units}

    def params(stored: bool = False) -> dict:
        if stored:
            return {f"{u.name}.weight": u._oriented(u.stored(v[u.name], gamma[u.name])[2]) for u in units}
        return {f"{u.name}.weight": u.weight(v[u.name], gamma[u.name]) for u in units}

    device = units[0].pre.device
    before = _block_error(block, params(stored=True), inputs, targets, dist, device)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    lr0 = 1.0 / steps
    for t in range(steps):
        g = int(order[t % total])
        owner = owners[g]
        signs = [torch.empty_like(x, dtype=torch.int8) for u in units for x in (v[u.name], gamma[u.name])]
        if owner == dist.rank:
            b = g - first
            with torch.enable_grad():
                loss = (_call(block, params(), inputs[b]).float() - targets[b].float()).pow(2).mean()
                grads = torch.autograd.grad(loss, [x for u in units for x in (v[u.name], gamma[u.name])])
            signs = [torch.sign(gr).to(torch.int8) for gr in grads]
        if dist.active:
            for s in signs:
                dist.broadcast_(s, owner)
        lr = lr0 * (1 - t / steps)
        with torch.no_grad():
            for k, u in enumerate(units):
                v[u.name].sub_(lr * signs[2 * k]).clamp_(-0.5, 0.5)
                gamma[u.name].sub_(lr * signs[2 * k + 1]).clamp_(*GAMMA_RANGE)
    after = _block_error(block, params(stored=True), inputs, targets, dist, device)
    if not after < before:
        return None
    out: dict = {u.name: u.stored(v[u.name].detach(), gamma[u.name].detach()) for u in units}
    out["error"] = (before, after)
    return out
