"""The values ``HFQuantConfig`` accepts, and the one error every config check raises (``reject``)."""

from __future__ import annotations

from typing import Any, NoReturn

from hfquant.core.errors import ConfigError
from hfquant.core.gguf_blocks import BLOCK_TYPES
from hfquant.core.gguf_types import MIXES

QUANT_METHOD = "hfquant"
METHODS = ("gptq", "rtn", "smoothquant")
WEIGHT_METHODS = ("rtn", "gptq")
ACTIVATION_SCHEMES = ("dynamic", "static")
SAVE_FORMATS = ("hfquant", "gptq", "compressed-tensors", "gguf", "onnx")
# gguf_type values: a block type, or one of llama.cpp's mixes (Q4_K_M, Q3_K_M, Q3_K_S; hfquant.core.gguf_types).
GGUF_TYPES = (*BLOCK_TYPES, *MIXES)
# gguf_head_type / gguf_embedding_type values (export only: the head and embeddings are rounded to nearest).
GGUF_TENSOR_TYPES = (*BLOCK_TYPES, "F16", "BF16", "F32")
CHECKPOINT_FORMATS = ("hfquant", "gptq", "gptq_v2")
LM_HEAD_BITS = (8,)
# quality -> the fields it sets when they are not given (GPTQ and RTN; SmoothQuant accepts only "default").
# Chosen by measurement on SmolLM2, reported on two texts (and how the choice was made): BENCHMARKS.md
# "Accuracy beyond GPTQ".
QUALITY: dict[str, dict[str, Any]] = {
    "default": {"observer": "hessian"},
    "best": {"observer": "hessian", "gptaq": True, "reconstruct_steps": 16},
}
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; int64 everywhere else

# ``bits: auto`` chooses per module among these (bits, group_size) unless ``candidates`` says otherwise.
DEFAULT_CANDIDATES: tuple[dict, ...] = (
    {"bits": 2, "group_size": 64},
    {"bits": 3, "group_size": 128},
    {"bits": 4, "group_size": 128},
    {"bits": 8, "group_size": 128},
)
AUTO = "auto"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def reject(field: str, value, expected: str) -> NoReturn:
    """Raise the one-line ``ConfigError`` of a bad value: ``HFQuantConfig.<flat field>: got ...; expected ...``."""
    raise ConfigError(f"HFQuantConfig.{field}: got {value!r}; expected {expected}")
