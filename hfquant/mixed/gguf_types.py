"""Which GGUF type each tensor gets: llama.cpp's rules (``llama-quant.cpp``, ``llama_tensor_get_type``) for the
types hfquant writes, restated here for Llama-family module names.

* A requested type whose block does not divide the tensor's row length falls back as llama.cpp falls back:
  Q4_K -> Q5_0, Q6_K -> Q8_0; a row length that is not a multiple of 32 at all -> F16 (the module stays float).
* ``Q4_K_M``: Q4_K everywhere, but Q6_K for ``attn_v`` (``v_proj``) and ``ffn_down`` (``down_proj``) in the
  layers where llama.cpp's ``use_more_bits(i, n)`` holds: the first and last eighth of the layers and every
  third one between.
* The output head (and the token embeddings when they are tied to it) is Q6_K, or Q8_0 when its rows are not
  a multiple of 256 (and Q8_0 stays Q8_0); untied token embeddings take the run's type.
"""

from __future__ import annotations

from hfquant.core.gguf_blocks import BLOCK_TYPES

_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def base_type(gguf_type: str) -> str:
    """The block type a (possibly mixed) ``gguf_type`` is built around."""
    return "Q4_K" if gguf_type == "Q4_K_M" else gguf_type


def fit_row(gguf_type: str, cols: int) -> str:
    """``gguf_type`` for a tensor with rows of ``cols`` values, after llama.cpp's fallback (``"F16"`` when no block
    type fits)."""
    t = gguf_type
    if t in BLOCK_TYPES and cols % BLOCK_TYPES[t].block_values:
        t = _FALLBACK.get(t, t)
    if t in BLOCK_TYPES and cols % BLOCK_TYPES[t].block_values:
        return "F16"
    return t


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the ``_M`` mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def module_types(modules: dict[str, int], gguf_type: str) -> dict[str, str]:
    """The GGUF type of each weight, ``modules`` being name -> row length (input features) in model order.

    ``v_proj`` and ``down_proj`` are counted in order, as llama.cpp counts ``attn_v`` and ``ffn_down``."""
    base = base_type(gguf_type)
    counts = {role: sum(n.endswith("." + role) for n in modules) for role in ("v_proj", "down_proj")}
    seen = dict.fromkeys(counts, 0)
    out = {}
    for name, cols in modules.items():
        t = base
        for role in counts:
            if name.endswith("." + role):
                if gguf_type == "Q4_K_M" and use_more_bits(seen[role], counts[role]):
                    t = "Q6_K"
                seen[role] += 1
        out[name] = fit_row(t, cols)
    return out


def head_type(gguf_type: str, cols: int, requested: str | None = None) -> str:
    """The output head's type (also the token embeddings' when tied): ``requested``, else llama.cpp's choice."""
    if requested is not None:
        return fit_row(requested, cols)
    base = base_type(gguf_type)
    if cols % 256 or base == "Q8_0":
        return "Q8_0" if cols % 32 == 0 else "F16"
    return "Q6_K"


def embedding_type(gguf_type: str, cols: int, requested: str | None = None) -> str:
    """Untied token embeddings' type: ``requested``, else the run's type (after the row-length fallback)."""
    return fit_row(requested or base_type(gguf_type), cols)
