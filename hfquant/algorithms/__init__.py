"""Pure tensor math: quantization grids (RTN) and the GPTQ solver. No transformers imports here."""

from hfquant.algorithms.gptq import GPTQResult, gptq_quantize
from hfquant.algorithms.rtn import QuantGrid, dequantize, fit_grid, quantize_codes, rtn_quantize

__all__ = ["GPTQResult", "QuantGrid", "dequantize", "fit_grid", "gptq_quantize", "quantize_codes", "rtn_quantize"]
