"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023 (arXiv 2211.10438); reference code mit-han-lab/smoothquant ``smooth.py``.

``Y = (X diag(s)^-1) (diag(s) W)``, with per input channel ``j``::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)        (both clamped to >= 1e-5)

where ``max|W_j|`` is the column abs-max over every Linear that reads ``X`` (q/k/v together). ``X / s`` is
folded into the preceding norm and ``W * s`` into the Linears, so smoothing is free at run time.

Int8 grids here are symmetric with ``qmax = 127``: weights per output channel, activations per token
(dynamic) or per tensor (static).
"""

from __future__ import annotations

import torch

QMAX = 127
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = act^alpha / w^(1-alpha)``, clamped to ``>= 1e-5``."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per input column abs-max over several ``[out, in]`` weights."""
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel symmetric int8: ``(q int8 [out, in], scale float32 [out])``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scale[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_activation_int8(x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """Per-token (``static_scale is None``) or per-tensor symmetric int8 of ``x [..., K]``.

    Returns ``(q int8 [..., K], scale float32 [..., 1])``.
    """
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / QMAX).clamp(min=1e-8)
    else:
        scale = static_scale.float().reshape(1).expand(*x.shape[:-1], 1)
    q = torch.clamp(torch.round(xf / scale), -QMAX, QMAX).to(torch.int8)
    return q, scale
