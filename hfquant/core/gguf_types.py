"""Which GGUF type each tensor gets: llama.cpp's rules (``llama-quant.cpp``, ``llama_tensor_get_type``) for the
types hfquant writes, restated here for Llama-family module names.

* A requested type whose block does not divide the tensor's row length falls back as llama.cpp falls back:
  Q4_K -> Q5_0, Q6_K -> Q8_0; a row length that is not a multiple of 32 at all -> F16 (the module stays float).
* ``Q4_K_M``: Q4_K everywhere, but Q6_K for ``attn_v`` (``v_proj``) and ``ffn_down`` (``down_proj``) in the
  layers where llama.cpp's ``use_more_bits(i, n)`` holds: the first and last eighth of the layers and every
  third one between.
* The output head (and the token embeddings when they are tied to it) is Q6_K, or Q8_0 when its rows are not
  a multiple of 256 (and Q8_0 stays Q8_0); untied token embeddings take the run's type.

The head and embeddings are rounded to their type in the hfquant model too (``round_gguf_embeddings_``), which keeps
the blocks it de-quantized in a buffer ``HELD_BLOCKS`` (uint8 ``[rows, row bytes]``, the file's bytes) of the
module that owns the weight (``embedding_modules``): the GGUF writer copies them, since rounding the rounded weight
again is not the identity for the types with searched scales (Q4_K, Q6_K).
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


HELD_BLOCKS = "gguf_blocks"


def embedding_modules(model, config) -> dict[str, str]:
    """``{module name: GGUF type}`` of ``model``'s output head and token embeddings under ``config`` (its
    ``gguf_type``, ``gguf_head_type``, ``gguf_embedding_type``): the modules whose weights the GGUF file stores
    (``output``, ``token_embd``) and that hold their blocks in ``HELD_BLOCKS``. A tied pair is one tensor in the file
    (``token_embd``, with the head's type): it appears once, under the input embeddings' name. Works on a meta
    skeleton (tying read from the config)."""
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tied = head is not None and emb is not None and (
        getattr(head, "weight", None) is getattr(emb, "weight", None)
        or bool(getattr(text, "tie_word_embeddings", False)))
    out = {}
    for role, module in (("head", head), ("embeddings", emb)):
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2 or id(module) not in names:
            continue
        if role == "head" and tied:
            out[names[id(emb)]] = head_type(config.gguf_type, w.shape[1], config.gguf_head_type)
            break
        cols = w.shape[1]
        out[names[id(module)]] = (head_type(config.gguf_type, cols, config.gguf_head_type) if role == "head" else
                                  embedding_type(config.gguf_type, cols, config.gguf_embedding_type))
    return out
