"""Interoperability: export hfquant checkpoints to the GPTQ layout and compressed-tensors, import GPTQ.

* ``export_checkpoint(src_dir, fmt, out_dir)``: convert a saved hfquant checkpoint (``fmt`` = ``"gptq"`` or
  ``"compressed-tensors"``); the command line is ``hfquant export DIR --format F OUT``.
* ``HFQuantConfig(save_format=...)``: ``save_pretrained`` writes that format directly.
* ``load_gptq(path)`` / ``gptq_config(path)``: load a GPTQ checkpoint (any tool's) into hfquant modules.

Layouts: ``hfquant.interop.gptq`` (GPTQ) and ``hfquant.interop.compressed_tensors``.
"""

from hfquant.errors import FormatError
from hfquant.interop.export import EXPORT_FORMATS, export_checkpoint
from hfquant.interop.load import gptq_config, load_gptq

__all__ = ["EXPORT_FORMATS", "FormatError", "export_checkpoint", "gptq_config", "load_gptq"]
