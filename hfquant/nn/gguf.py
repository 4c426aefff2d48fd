"""``QuantLinearGGUF``: a Linear whose weight is stored as llama.cpp GGUF blocks (``gguf_blocks.BLOCK_TYPES``).

Tensors (all saved; names and shapes are the checkpoint format):

* ``qweight``: uint8 ``[out, in / block_values * block_bytes]``, each row the type's blocks exactly as a GGUF
  file stores them (``hfquant.core.gguf_blocks``), so export copies the bytes.
* ``bias``: float ``[out]``, when the source Linear had one (GGUF's Llama family has none; kept for others).

``forward`` de-quantizes the blocks with ggml's float32 arithmetic (cached per module, in the input's dtype)
and calls ``F.linear``: the model computes what llama.cpp computes from the file, at float speed.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hfquant.core.gguf_blocks import block_type, dequantize_rows
from hfquant.core.gguf_format import GGUFBlocks
from hfquant.kernels.operands import cached_operands
from hfquant.nn.stored import holds, storage_dtype


@holds(GGUFBlocks.kind)
class QuantLinearGGUF(nn.Module):
    """Linear with GGUF block-quantized weights.

    Args:
        in_features: input features (a multiple of the type's block size: 32, or 256 for the k-quants).
        out_features: output features.
        gguf_type: the block type, e.g. ``"Q4_K"``.
        bias: whether there is a bias.
        dtype: dtype of ``bias`` and of the outputs' reference weight.
        device: where to allocate (``"meta"`` while transformers builds the skeleton).
    """

    def __init__(self, in_features: int, out_features: int, gguf_type: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        bt = block_type(gguf_type)
        if in_features % bt.block_values:
            raise ValueError(f"GGUF {gguf_type}: in_features {in_features} is not a multiple of {bt.block_values}")
        self.in_features, self.out_features, self.gguf_type, self.dtype = in_features, out_features, gguf_type, dtype
        row_bytes = in_features // bt.block_values * bt.block_bytes
        self.qweight = nn.Parameter(torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device),
                                    requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._kernel_cache: dict = {}

    @classmethod
    def from_blocks(cls, linear: nn.Module, data: torch.Tensor, gguf_type: str, dtype: torch.dtype) -> "QuantLinearGGUF":
        """Build from a float Linear (for its bias) and its packed blocks ``data`` (``gguf_blocks.pack_rows``)."""
        bias = getattr(linear, "bias", None)
        m = cls(linear.in_features, linear.out_features, gguf_type, bias is not None, dtype=dtype, device="meta")
        m.qweight = nn.Parameter(data.contiguous().clone(), requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone().to(data.device), requires_grad=False)
        return m

    @classmethod
    def from_stored(cls, linear: nn.Module, fmt: GGUFBlocks, stored: tuple[torch.Tensor, ...]) -> QuantLinearGGUF:
        return cls.from_blocks(linear, stored[0], fmt.gguf_type, storage_dtype(linear))

    @classmethod
    def skeleton(cls, fmt: GGUFBlocks, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype) -> QuantLinearGGUF:
        return cls(in_features, out_features, fmt.gguf_type, bias=bias, dtype=dtype, device="meta")

    @property
    def format(self) -> GGUFBlocks:
        return GGUFBlocks(self.gguf_type)

    @property
    def packed(self) -> torch.Tensor:
        """The packed blocks (saved as ``qweight``; every quantized module names its packed codes ``packed``)."""
        return self.qweight

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out, in]``: ggml's de-quantization in float32, then cast to ``dtype`` (default the
        module's)."""
        return dequantize_rows(self.gguf_type, self.qweight, self.in_features).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = cached_operands(self, "dequantized", lambda: self.dequantize(x.dtype).to(x.device),
                                 extra=(x.dtype, x.device))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, gguf_type={self.gguf_type}, "
                f"bias={self.bias is not None}")
