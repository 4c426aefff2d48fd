"""Pure tensor math and data: quantization grids (RTN), the GPTQ solver, the weight formats. No transformers here.

Importing the package registers the built-in weight formats (``int_grid.IntGrid``, ``gguf_format.GGUFBlocks``)
with ``hfquant.core.weight_format``, so every layer above finds them."""

from hfquant.core.gguf_format import GGUFBlocks
from hfquant.core.gptq import gptq_quantize, GPTQResult
from hfquant.core.grids import dequantize, fit_grid, QuantGrid, quantize_codes, rtn_quantize
from hfquant.core.int_grid import IntGrid
from hfquant.core.weight_format import Scheme, WeightFormat

__all__ = ["GGUFBlocks", "GPTQResult", "IntGrid", "QuantGrid", "Scheme", "WeightFormat", "dequantize", "fit_grid",
           "gptq_quantize", "quantize_codes", "rtn_quantize"]
