"""``HalfStoredLinear``: a float32 Linear whose weight is held in bfloat16 or float16 because every value is exactly
one of that type's (a float32 model loaded from a bf16 or fp16 checkpoint). Nothing is rounded: the weight is the
same numbers in half the bytes, and the matmul is float32 on float32 activations (``hfquant.kernels.half``).

Tensors: ``weight`` ``[out, in]`` in bfloat16 or float16, ``bias`` ``[out]`` (float32, when the source had one).
``state_dict`` gives the weight back in the dtype the model was loaded in (``float_dtype``, float32), so a saved
checkpoint is the same as the float model's; ``load_state_dict`` takes only tensors that are exactly 16-bit.
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.kernels.half import half_linear

HALF_DTYPES = (torch.bfloat16, torch.float16)  # tried in this order
_CHECK_ROWS = 1024  # rows of W compared at a time (bounded extra memory on a large output head)


def exact_half_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in the first of ``HALF_DTYPES`` that holds every value exactly (NaN and values out of range never
    match), or ``None``. Converted a chunk of rows at a time, each chunk checked as it is converted (one pass)."""
    w = weight.detach()
    rows = w.reshape(w.shape[0], -1) if w.dim() > 0 else w.reshape(1, 1)
    for dtype in HALF_DTYPES:
        out = torch.empty(rows.shape, dtype=dtype, device=w.device)
        if all(torch.equal(o.copy_(c).to(c.dtype), c) for o, c in zip(out.split(_CHECK_ROWS), rows.split(_CHECK_ROWS))):
            return out.view(w.shape)
    return None


def exact_half_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype ``exact_half_copy`` would hold ``weight`` in, or ``None``."""
    copy = exact_half_copy(weight)
    return None if copy is None else copy.dtype


class HalfStoredLinear(nn.Module):
    """A float32 Linear with its weight stored in 16 bits, exactly (see the module docstring). Built by
    ``from_linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, float_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.float_dtype = float_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> HalfStoredLinear | None:
        """The same Linear with its weight in bfloat16 or float16, or ``None`` when the weight is not float32 or not
        exactly 16-bit."""
        w = linear.weight
        if w.dtype is not torch.float32 or w.device.type == "meta":
            return None
        half = exact_half_copy(w)
        return None if half is None else cls(half, linear.bias, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_linear(x, self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``dtype`` (exact in float32)."""
        return self.weight.to(dtype)

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` / ``.half()`` / ``.float()`` change the dtype the module computes in (and saves) as they
        would an ``nn.Linear``'s: the dtype a float32 tensor becomes under ``fn`` (a device move keeps it)."""
        probe = fn(self.weight.new_empty(0, dtype=self.float_dtype))
        super()._apply(fn, recurse)
        if probe.dtype.is_floating_point:
            self.float_dtype = probe.dtype
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination and destination[key].dtype in HALF_DTYPES:
            destination[key] = destination[key].to(self.float_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is not None and self.weight.dtype in HALF_DTYPES and w.dtype is not self.weight.dtype:
            if w.shape != self.weight.shape or not torch.equal(w.to(self.weight.dtype).to(w.dtype), w):
                error_msgs.append(f"{key}: {self.weight.dtype}-stored Linear {tuple(self.weight.shape)} got a "
                                  f"{w.dtype} tensor {tuple(w.shape)} whose values are not all exact in "
                                  f"{self.weight.dtype}; load the float model again instead")
                return
            state_dict = {**state_dict, key: w.to(self.weight.dtype)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stored={str(self.weight.dtype).removeprefix('torch.')}, computes={str(self.float_dtype).removeprefix('torch.')}")
