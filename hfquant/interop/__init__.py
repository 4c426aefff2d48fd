"""Interoperability: export hfquant checkpoints to the GPTQ layout and compressed-tensors, import GPTQ.

* ``export_checkpoint(src_dir, fmt, out_dir)``: convert a saved hfquant checkpoint (``fmt`` = ``"gptq"`` or
  ``"compressed-tensors"``); ``cli_export(src, fmt, out) -> int`` wraps it for a command line.
* ``HFQuantConfig(save_format=...)``: ``save_pretrained`` writes that format directly.
* ``load_gptq(path)`` / ``gptq_config(path)``: load a GPTQ checkpoint (any tool's) into hfquant modules.

Layouts: ``hfquant.interop.gptq`` (GPTQ) and ``hfquant.interop.compressed_tensors``.
"""

from hfquant.errors import FormatError
from hfquant.interop.export import EXPORT_FORMATS, cli_export, export_checkpoint
from hfquant.interop.load import gptq_config, load_gptq

__all__ = ["EXPORT_FORMATS", "FormatError", "cli_export", "export_checkpoint", "gptq_config", "load_gptq"]
