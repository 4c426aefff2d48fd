"""The ``nn`` module that holds each weight format (``hfquant.core.weight_format``).

A module class holds a format by registering for its ``kind`` (``holds``) and implementing two class methods:
``from_stored(linear, fmt, stored)`` (a quantized module from a float Linear, for its bias and dtype, and the
format's stored tensors) and ``skeleton(fmt, in_features, out_features, bias, dtype)`` (an empty module on the meta
device that a checkpoint's tensors load into). A format no class registered for is held by ``QuantLinearStored``,
which keeps the stored tensors under their field names and de-quantizes them (``fmt.dequantize``) for ``F.linear``:
correct on every device, at float speed, with no kernel of its own.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hfquant.core.weight_format import WeightFormat
from hfquant.kernels.common import cached_operands
from hfquant.nn.graph import in_out_features

_MODULES: dict[str, type] = {}


def holds(kind: str):
    """Class decorator: the module class holds weights of the format ``kind``."""
    def register(cls):
        _MODULES[kind] = cls
        return cls
    return register


def module_class(fmt: WeightFormat) -> type:
    """The module class that holds ``fmt`` (``QuantLinearStored`` unless one registered for its kind)."""
    return _MODULES.get(fmt.kind, QuantLinearStored)


def quantized_classes() -> tuple[type, ...]:
    """Every module class that holds a weight format (registered ones and ``QuantLinearStored``)."""
    return (*_MODULES.values(), QuantLinearStored)


def quantized_module(linear: nn.Module, fmt: WeightFormat, stored: tuple[torch.Tensor, ...]) -> nn.Module:
    """The quantized module replacing ``linear``, holding ``stored`` (``fmt``'s stored tensors)."""
    return module_class(fmt).from_stored(linear, fmt, stored)


def skeleton(fmt: WeightFormat, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Module:
    """An empty (meta) module of ``fmt`` for a checkpoint to load into."""
    return module_class(fmt).skeleton(fmt, in_features, out_features, bias, dtype)


def storage_dtype(linear: nn.Module) -> torch.dtype:
    """The float dtype a quantized module built from ``linear`` keeps (scales, biases, outputs): the Linear's
    bias's, else its weight's."""
    bias = getattr(linear, "bias", None)
    return bias.dtype if bias is not None else linear.weight.dtype


class QuantLinearStored(nn.Module):
    """A Linear holding any weight format's stored tensors as frozen parameters named by ``fmt.fields`` (saved with
    the model), de-quantized once per input dtype and device for ``F.linear``."""

    def __init__(self, fmt: WeightFormat, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.format, self.in_features, self.out_features, self.dtype = fmt, in_features, out_features, dtype
        for field, t in zip(fmt.fields, fmt.empty(out_features, in_features, "meta"), strict=True):
            setattr(self, field, nn.Parameter(torch.zeros(t.shape, dtype=t.dtype, device=device), requires_grad=False))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._kernel_cache: dict = {}

    @classmethod
    def from_stored(cls, linear: nn.Module, fmt: WeightFormat, stored: tuple[torch.Tensor, ...]) -> QuantLinearStored:
        bias = getattr(linear, "bias", None)
        in_features, out_features = in_out_features(linear)
        m = cls(fmt, in_features, out_features, bias is not None, storage_dtype(linear), device="meta")
        for field, t in zip(fmt.fields, stored, strict=True):
            setattr(m, field, nn.Parameter(t.contiguous().clone(), requires_grad=False))
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def skeleton(cls, fmt: WeightFormat, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype) -> QuantLinearStored:
        return cls(fmt, in_features, out_features, bias, dtype, device="meta")

    def stored(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in self.format.fields)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.format.dequantize(self.stored(), self.in_features).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = cached_operands(self, "dequantized", lambda: self.dequantize(x.dtype).to(x.device),
                                 extra=(x.dtype, x.device))
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"bias={self.bias is not None}")
