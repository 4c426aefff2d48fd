"""``HFQuantConfig`` and its sections (``GPTQArgs``, ``SmoothQuantArgs``, ``CalibrationArgs``, ``GGUFArgs``,
``MixedArgs``).

- ``constants``: the accepted values (methods, formats, GGUF types, ``QUALITY``) and ``reject``;
- ``sections``: the section dataclasses, each checking its own fields, and ``read_by``, the field metadata that
  states once which methods read a field and its flat name;
- ``fields``: the field table read from those declarations (``FieldSpec``), and the two key orders;
- ``checks``: the rules across sections;
- ``hfquant_config``: ``HFQuantConfig`` (flat and sectioned construction, flat attributes forwarded to the
  sections, flat ``to_dict``) and what is derived from the table: ``DEFAULTS``, ``METHOD_FIELDS``,
  ``GGUF_FIELDS``, ``_unread_fields``, ``resolve_method_fields``.
"""

from hfquant.config.constants import (
    _is_int, ACTIVATION_SCHEMES, AUTO, CHECKPOINT_FORMATS, DEFAULT_CANDIDATES, GGUF_TENSOR_TYPES, GGUF_TYPES,
    LM_HEAD_BITS, METHODS, QUALITY, QUANT_METHOD, SAVE_FORMATS, SEED_MAX, WEIGHT_METHODS,
)
from hfquant.config.fields import FieldSpec
from hfquant.config.hfquant_config import (
    _SHARED_FIELDS, _unread_fields, DEFAULTS, FIELDS, GGUF_FIELDS, HFQuantConfig, METHOD_FIELDS,
    resolve_method_fields, SECTIONS,
)
from hfquant.config.sections import CalibrationArgs, GGUFArgs, GPTQArgs, MixedArgs, SmoothQuantArgs

__all__ = [
    "ACTIVATION_SCHEMES", "AUTO", "CHECKPOINT_FORMATS", "DEFAULT_CANDIDATES", "DEFAULTS", "FIELDS", "FieldSpec",
    "GGUF_FIELDS", "GGUF_TENSOR_TYPES", "GGUF_TYPES", "LM_HEAD_BITS", "METHOD_FIELDS", "METHODS", "QUALITY",
    "QUANT_METHOD", "SAVE_FORMATS", "SECTIONS", "SEED_MAX", "WEIGHT_METHODS", "HFQuantConfig", "GPTQArgs",
    "SmoothQuantArgs", "CalibrationArgs", "GGUFArgs", "MixedArgs", "resolve_method_fields", "_is_int",
    "_unread_fields", "_SHARED_FIELDS",
]
