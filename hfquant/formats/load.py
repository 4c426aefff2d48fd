"""Importing GPTQ checkpoints (any tool's: AutoGPTQ, GPTQModel, optimum, hfquant) into hfquant modules.

transformers picks the quantizer from ``config.json``'s ``quantization_config``: for ``quant_method:
"gptq"`` it is its own GPTQ integration (optimum + gptqmodel), and passing
``quantization_config=HFQuantConfig(...)`` to ``from_pretrained`` does not override it
(``AutoHfQuantizer.merge_quantization_configs`` raises "The model is quantized with GPTQConfig but you
are passing a HFQuantConfig config"). So the import hands transformers a config whose
``quantization_config`` is hfquant's, with ``checkpoint_format="gptq"``, through the ``config=``
argument::

    model = hfquant.formats.load_gptq(path)                      # AutoModelForCausalLM by default
    model = AutoModelForCausalLM.from_pretrained(path, config=hfquant.formats.gptq_config(path))

The hfquant quantizer then gives every module with a ``qweight`` in the files a skeleton holding the
GPTQ tensors, and converts it to ``QuantLinearWeightOnly`` after loading (codes and zero points exactly;
float16 scales are cast to the model dtype, exactly for float32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from hfquant.config import HFQuantConfig
from hfquant.core.errors import FormatError
from hfquant.formats.gptq import GPTQ_BITS, GPTQ_FORMATS


def read_gptq_config(path: str | os.PathLike) -> dict:
    """The GPTQ ``quantization_config`` of a local checkpoint folder (``config.json``, else ``quantize_config.json``)."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FormatError(f"{folder}: no config.json; expected a local GPTQ checkpoint folder")
    q = json.loads(cfg_file.read_text()).get("quantization_config")
    if q is None and (folder / "quantize_config.json").is_file():
        q = json.loads((folder / "quantize_config.json").read_text())
        q.setdefault("quant_method", "gptq")
    if not q or q.get("quant_method") != "gptq":
        found = None if not q else q.get("quant_method")
        raise FormatError(f"{folder}: quantization_config.quant_method is {found!r}; expected 'gptq'")
    return q


def gptq_to_hfquant_config(q: dict, **overrides):
    """``HFQuantConfig`` describing a GPTQ ``quantization_config`` (``checkpoint_format`` gptq or gptq_v2)."""
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in GPTQ_FORMATS:
        raise FormatError(f"GPTQ checkpoint_format {fmt!r} is not supported; expected one of {list(GPTQ_FORMATS)} "
                          "(marlin/bitblas checkpoints are repacked and cannot be read here)")
    if q.get("bits") not in GPTQ_BITS:
        raise FormatError(f"GPTQ bits={q.get('bits')!r}; expected one of {list(GPTQ_BITS)}")
    if q.get("dynamic"):
        raise FormatError("GPTQ config has per-module 'dynamic' overrides, which hfquant does not import")
    damp = q.get("damp_percent", 0.01)
    kw = {"method": "gptq", "bits": q["bits"], "group_size": q.get("group_size", 128), "sym": q.get("sym", True),
          "desc_act": bool(q.get("desc_act", False)), "static_groups": bool(q.get("static_groups", False)),
          "true_sequential": bool(q.get("true_sequential", True)),
          "damp_percent": damp if isinstance(damp, (int, float)) and 0 <= damp <= 1 else 0.01,
          "checkpoint_format": fmt}
    kw.update(overrides)
    return HFQuantConfig(**kw)


def gptq_config(path: str | os.PathLike, **overrides):
    """The checkpoint's transformers config with an hfquant ``quantization_config`` that imports the GPTQ
    tensors; pass it as ``from_pretrained(path, config=...)``. ``overrides`` set ``HFQuantConfig`` fields
    (e.g. ``save_format="compressed-tensors"``)."""
    hq = gptq_to_hfquant_config(read_gptq_config(path), **overrides)
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = hq.to_dict()
    return config


def load_gptq(path: str | os.PathLike, model_class=None, **kwargs):
    """Load a GPTQ checkpoint folder into hfquant modules: ``model_class.from_pretrained(path, config=gptq_config(path))``.

    ``model_class`` defaults to ``AutoModelForCausalLM``; other keyword arguments go to ``from_pretrained``.
    """
    if model_class is None:
        model_class = AutoModelForCausalLM
    return model_class.from_pretrained(path, config=gptq_config(path), **kwargs)
