"""``ExpertLinear``: one expert's projection inside a fused Mixture-of-Experts module, seen as a Linear.

transformers 5.x keeps a MoE block's experts as 3-D parameters (``experts.gate_up_proj`` of shape
``[experts, 2I, H]``, ``experts.down_proj`` ``[experts, H, I]``; some families store them transposed). While a run
quantizes them, each expert's slice is an ``ExpertLinear``: it owns no tensor, and its ``weight`` and ``bias`` are
views of the fused parameters (read when asked, so a parameter replaced by a load is seen), in the Linear's
``[out, in]`` orientation. The rest of hfquant (calibration hooks, GPTQ, RTN, the per-module schemes, resume,
several processes) then treats every expert's projection as one more Linear, called with exactly the tokens the
router sends to that expert (``hfquant.nn.experts``).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class ExpertLinear(nn.Module):
    """Expert ``index``'s slice of the fused parameter ``proj`` of ``owner`` (``y = x W^T + b``).

    ``transposed``: the fused parameter is ``[experts, in, out]`` (gpt-oss and others) instead of ``[experts, out,
    in]``. ``row_weights``: set by the owner before each call during calibration, the routing weight of each row
    of the input (the Hessian weights rows by it; ``hfquant.calibration.blocks.HessianStat``)."""

    linear_view = True  # its ``weight`` reads as an ``nn.Linear``'s, ``[out, in]`` (``WeightFormat.module_error``)

    def __init__(self, owner: nn.Module, proj: str, index: int, transposed: bool, bias_name: str | None):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a child: the owner holds this module
        self.proj, self.index, self.transposed, self.bias_name = proj, index, transposed, bias_name
        self.row_weights: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self._owner, self.proj)[self.index]
        return w.t() if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.bias_name is None else getattr(self._owner, self.bias_name)[self.index]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.proj}[{self.index}], in_features={self.in_features}, out_features={self.out_features}"
