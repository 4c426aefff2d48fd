"""The last step of a quantized model's load: quantized tensors frozen and converted to their kernels' layouts,
and a float32 output head stored in 16 bits where that is exact."""

from __future__ import annotations

import logging
import os

import torch

from hfquant.kernels import half as half_kernels
from hfquant.nn import prepare_model
from hfquant.nn.graph import output_head_name, set_submodule
from hfquant.nn.half import HalfStoredLinear
from hfquant.nn.w8a8 import QuantLinearW8A8
from hfquant.nn.weight_only import QuantLinearWeightOnly

logger = logging.getLogger(__name__)


def freeze_(model) -> None:
    """Freeze the quantized tensors and convert them to their kernels' layouts once, at load time; store a float
    output head in 16 bits where that is exact (``store_head_in_16_bits``)."""
    for m in model.modules():
        if isinstance(m, (QuantLinearWeightOnly, QuantLinearW8A8)):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    prepare_model(model)
    store_head_in_16_bits(model)


def store_head_in_16_bits(model) -> None:
    """Replace a float32 output head on the CPU by ``HalfStoredLinear`` when every weight is exactly bfloat16 (or
    float16), as in a float32 model loaded from a 16-bit checkpoint: the same values in half the bytes, and with
    hfquant's 16-bit GEMV, decode reads half as much for the head. Not for tied heads (declared in the config, or the
    tensor shared with another parameter), other devices and dtypes, a CPU without the kernel, or with
    ``HFQUANT_HEAD_16BIT=0``."""
    if os.environ.get("HFQUANT_HEAD_16BIT", "1") == "0":
        return
    name = output_head_name(model)
    head = model.get_submodule(name) if name else None
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or head.weight.dtype is not torch.float32:
        return
    if next(head.buffers(recurse=False), None) is not None:  # e.g. its GGUF blocks, kept for the GGUF writer
        return
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shared = any(p.data_ptr() == head.weight.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)
                 if not n.startswith(f"{name}."))
    if getattr(text_config, "tie_word_embeddings", False) or shared or not half_kernels.cpu_gemv_available():
        return
    half = HalfStoredLinear.from_linear(head)
    if half is not None:
        set_submodule(model, name, half)
        logger.info("hfquant: %s stored in %s (its float32 values are exactly 16-bit; decode reads half the bytes)",
                    name, half.weight.dtype)
