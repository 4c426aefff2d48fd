"""``QuantLinearWeightOnly``: a Linear with low-bit integer weights (2/3/4/8 bits) and float activations.

Tensors (all saved; names and shapes are the checkpoint format):

* ``weight``: int32 ``[out, ceil(in/32), bits]`` packed codes, layout in ``hfquant.core.packing``.
* ``scales``: float ``[out, G]`` group scales (model dtype), ``G = ceil(in / group_size)``.
* ``zeros``: uint8 ``[out, G]`` group zero points (integers in ``[0, 2**bits - 1]``).
* ``g_idx``: int32 ``[in]`` group of each input column.
* ``bias``: float ``[out]``, when the source Linear had one.

The dequantized weight is ``W[o, i] = scales[o, g_idx[i]] * (q[o, i] - zeros[o, g_idx[i]])``.
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.core.grids import dequantize_grouped
from hfquant.core.int_grid import IntGrid
from hfquant.core.packing import pack_codes, packed_shape, SUPPORTED_BITS, unpack_codes
from hfquant.nn.stored import holds, storage_dtype
from hfquant.kernels.weight_only import weight_only_linear


@holds(IntGrid.kind)
class QuantLinearWeightOnly(nn.Module):
    """Weight-only quantized Linear (W4A16 and the 2/3/8-bit variants): packed integer codes with a float scale and
    an integer zero point per group of input columns, float activations. ``forward`` calls one op chosen at call
    time (``hfquant.kernels``). Built by ``from_float`` (or as an empty skeleton that a checkpoint fills);
    tensors and the dequantization formula are in the module docstring.

    Args:
        in_features: input features.
        out_features: output features.
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns per group, or -1 for one group per output row.
        bias: whether there is a bias.
        dtype: dtype of ``scales`` and ``bias``.
        device: where to allocate (``"meta"`` while transformers builds the skeleton).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        g = in_features if group_size == -1 else group_size
        n_groups = (in_features + g - 1) // g

        def param(t):
            return nn.Parameter(t, requires_grad=False)

        self.weight = param(torch.zeros(packed_shape(out_features, in_features, bits), dtype=torch.int32, device=device))
        self.scales = param(torch.zeros(out_features, n_groups, dtype=dtype, device=device))
        self.zeros = param(torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.g_idx = param(torch.zeros(in_features, dtype=torch.int32, device=device))
        self.bias = param(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel_cache: dict = {}

    @classmethod
    def from_float(cls, linear: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, group_size: int) -> "QuantLinearWeightOnly":
        """Build from a float Linear (for its bias and dtype) and quantization results.

        ``codes`` is ``[out, in]`` in the Linear's ``y = x W^T`` orientation (for a GPT-2 ``Conv1D``,
        whose weight is ``[in, out]``, pass the codes of the transposed weight).
        """
        out_features, in_features = codes.shape
        bias = getattr(linear, "bias", None)
        dtype = storage_dtype(linear)
        device = codes.device
        m = cls(in_features, out_features, bits, group_size, bias is not None, dtype=dtype, device=device)
        m.weight.data = pack_codes(codes, bits)
        # Clones: results may be views of one tensor, and safetensors refuses shared storage.
        m.scales.data = scales.to(dtype).clone()
        m.zeros.data = zeros.to(device=device, dtype=torch.uint8).clone()
        m.g_idx.data = g_idx.to(device=device, dtype=torch.int32).clone()
        if bias is not None:
            m.bias.data = bias.detach().clone().to(device)
        return m.to(linear.weight.device)

    @classmethod
    def from_stored(cls, linear: nn.Module, fmt: IntGrid, stored: tuple[torch.Tensor, ...]) -> QuantLinearWeightOnly:
        """``from_float`` with an ``IntGrid``'s stored tensors ``(codes, scales, zeros, g_idx)``."""
        return cls.from_float(linear, *stored, fmt.bits, fmt.group_size)

    @classmethod
    def skeleton(cls, fmt: IntGrid, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype) -> QuantLinearWeightOnly:
        return cls(in_features, out_features, fmt.bits, fmt.group_size, bias=bias, dtype=dtype, device="meta")

    @property
    def format(self) -> IntGrid:
        return IntGrid(self.bits, self.group_size)

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes (saved as ``weight``; every quantized module names its packed codes ``packed``)."""
        return self.weight

    def codes(self) -> torch.Tensor:
        """Unpacked int32 codes ``[out, in]``."""
        return unpack_codes(self.weight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weight ``[out, in]`` computed in float32, then cast to ``dtype`` (default the scales' dtype)."""
        codes = self.codes().float()
        scales, zeros = self.scales.float(), self.zeros.float()
        g = self.in_features if self.group_size == -1 else self.group_size
        n_out, n_groups = scales.shape
        if self._contiguous_groups(g):
            # g_idx == i // g: broadcast per group instead of gathering [out, in] scales (same float ops).
            pad = n_groups * g - self.in_features
            c = torch.nn.functional.pad(codes, (0, pad)).view(n_out, n_groups, g)
            w = (c - zeros[..., None]) * scales[..., None]
            w = w.view(n_out, n_groups * g)[:, : self.in_features]
        else:
            w = dequantize_grouped(codes, scales, zeros, self.g_idx)
        return w.to(dtype or self.scales.dtype)

    def _contiguous_groups(self, g: int) -> bool:
        key = self.g_idx.data_ptr()
        cached = self._kernel_cache.get("contiguous")
        if cached is None or cached[0] != key:
            arange = torch.arange(self.in_features, device=self.g_idx.device) // g
            cached = (key, bool(torch.equal(self.g_idx.long(), arange)))
            self._kernel_cache["contiguous"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weight_only_linear(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
