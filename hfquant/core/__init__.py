"""Pure tensor math: quantization grids (RTN) and the GPTQ solver. No transformers imports here."""

from hfquant.core.gptq import gptq_quantize, GPTQResult
from hfquant.core.grids import dequantize, fit_grid, QuantGrid, quantize_codes, rtn_quantize

__all__ = ["GPTQResult", "QuantGrid", "dequantize", "fit_grid", "gptq_quantize", "quantize_codes", "rtn_quantize"]
