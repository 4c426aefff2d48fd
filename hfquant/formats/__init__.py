"""Interoperability: export hfquant checkpoints to the GPTQ layout and compressed-tensors, import GPTQ.

* ``export_checkpoint(src_dir, fmt, out_dir)``: convert a saved hfquant checkpoint (``fmt`` = ``"gptq"`` or
  ``"compressed-tensors"``); the command line is ``hfquant export DIR --format F OUT``.
* ``HFQuantConfig(save_format=...)``: ``save_pretrained`` writes that format directly.
* ``load_gptq(path)`` / ``gptq_config(path)``: load a GPTQ checkpoint (any tool's) into hfquant modules.
* ``export_gguf(src_dir, out_dir)`` / ``load_gguf(path)``: write a llama.cpp GGUF file, read one into hfquant modules.

Layouts: ``hfquant.formats.gptq`` (GPTQ) and ``hfquant.formats.compressed_tensors``.
"""

from hfquant.core.errors import FormatError
from hfquant.formats.export import export_checkpoint, EXPORT_FORMATS
from hfquant.formats.gguf import export_gguf, load_gguf
from hfquant.formats.load import gptq_config, load_gptq

__all__ = ["EXPORT_FORMATS", "FormatError", "export_checkpoint", "export_gguf", "gptq_config", "load_gguf", "load_gptq"]
