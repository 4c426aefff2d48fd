"""``QuantLinearW8A8``: int8 weights (per output channel) and int8 activations (per token, or static per tensor).

Tensors (the checkpoint format):

* ``weight``: int8 ``[out, 1, in]``. The singleton middle dimension is deliberate: a transformers process
  that has not imported hfquant hits a size mismatch on ``nn.Linear.weight`` and raises, instead of
  silently casting the int8 codes into a float Linear.
* ``weight_scale``: float32 ``[out]``; ``W ≈ weight_scale[:, None] * weight``.
* ``input_scale``: float32 ``[1]``: 0 means dynamic per-token scales computed at run time; a positive
  value is the static per-tensor activation scale.
* ``bias``: float ``[out]`` when the source Linear had one.

``y = (q(x) @ q(W)^T) * s_x * s_w + b`` with an int8 x int8 -> int32 matmul (``hfquant.kernels.w8a8``).
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.core.smoothquant import quantize_weight_int8
from hfquant.kernels.operands import cached_operands
from hfquant.kernels.w8a8 import w8a8_linear
from hfquant.nn.weight_only import storage_dtype


class QuantLinearW8A8(nn.Module):
    """W8A8 Linear (SmoothQuant): int8 weights with one float32 scale per output channel, and int8 activations,
    quantized per token at run time (``input_scale == 0``) or with one static per-tensor scale; the int8 x int8
    product accumulates in int32. ``forward`` calls one op chosen at call time (``hfquant.kernels.w8a8``).
    Built by ``from_float`` (or as an empty skeleton that a checkpoint fills); tensors are listed in the module
    docstring.

    Args:
        in_features, out_features: shape of the source Linear.
        bias: whether there is a bias.
        dtype: dtype of the bias (and of the output).
        device: where to allocate (``"meta"`` while transformers builds the skeleton).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

        def param(t):
            return nn.Parameter(t, requires_grad=False)

        self.weight = param(torch.zeros(out_features, 1, in_features, dtype=torch.int8, device=device))
        self.weight_scale = param(torch.ones(out_features, dtype=torch.float32, device=device))
        self.input_scale = param(torch.zeros(1, dtype=torch.float32, device=device))
        self.bias = param(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel_cache: dict = {}

    @classmethod
    def from_float(cls, linear: nn.Module, weight: torch.Tensor, input_scale: float | None = None,
                   codes: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> "QuantLinearW8A8":
        """Build from a float Linear (for bias/dtype) and its ``[out, in]`` float ``weight`` (already smoothed).

        ``codes``/``scales`` (int8 ``[out, in]``, ``[out]``) override the round-to-nearest weight, e.g. with GPTQ's.
        """
        out_f, in_f = weight.shape
        bias = getattr(linear, "bias", None)
        dtype = storage_dtype(linear)
        device = weight.device
        m = cls(in_f, out_f, bias is not None, dtype=dtype, device=device)
        if codes is None:
            codes, scales = quantize_weight_int8(weight.detach())
        m.weight.data = codes.to(device=device, dtype=torch.int8).reshape(out_f, 1, in_f).clone()
        m.weight_scale.data = scales.to(device=device, dtype=torch.float32).clone()
        if input_scale is not None:
            m.input_scale.data = torch.tensor([float(input_scale)], device=device)
        if bias is not None:
            m.bias.data = bias.detach().clone().to(device)
        return m

    @property
    def dynamic(self) -> bool:
        """Whether activation scales are computed per token at run time (``input_scale == 0``). Cached per
        tensor, so a forward pass on CUDA does not synchronise with the host (and can be graph-captured)."""
        return cached_operands(self, "dynamic", lambda: float(self.input_scale) == 0.0)

    def dequantize(self) -> torch.Tensor:
        """Float32 weight ``[out, in]``."""
        return self.weight.reshape(self.out_features, self.in_features).float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self)

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.dynamic else "static per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={mode}, bias={self.bias is not None}"
