"""Which GGUF type each tensor gets: llama.cpp's rules (``llama-quant.cpp``, ``llama_tensor_get_type``) for the
types hfquant writes, restated here for Llama-family module names (dense models).

* A requested type whose block does not divide the tensor's row length falls back as llama.cpp falls back:
  Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; a row length that is not a multiple of 32 at all -> F16
  (the module stays float).
* The mixes (``MIXES``) are built around one block type. ``Q4_K_M``: Q4_K everywhere, but Q6_K for ``attn_v``
  (``v_proj``, or a fused ``qkv_proj``) and ``ffn_down`` (``down_proj``) in the layers where llama.cpp's
  ``use_more_bits(i, n)`` holds: the first and last eighth of the layers and every third one between.
  ``Q3_K_M``: Q3_K everywhere, but ``attn_v`` Q5_K in its first two layers and Q4_K after, ``ffn_down`` Q5_K in
  the first sixteenth of the layers (``i < n // 16``) and Q4_K after, ``attn_output`` (``o_proj``) Q4_K.
  ``Q3_K_S``: Q3_K everywhere (llama.cpp's Q3_K_S rules concern 8-expert models only).
* The output head (and the token embeddings when they are tied to it) is Q6_K, or Q8_0 when its rows are not
  a multiple of 256 (and Q8_0 stays Q8_0); untied token embeddings take the run's type.

Not restated: llama.cpp's rules for 8-expert MoE models (``n_expert == 8``), 70B models (``attn_v`` of Q3_K_M / Q4_K_M
bumped to Q5_K) and Falcon.

The head and embeddings are rounded to their type in the hfquant model too (``round_gguf_embeddings_``), which keeps
the blocks it de-quantized in a buffer ``HELD_BLOCKS`` (uint8 ``[rows, row bytes]``, the file's bytes) of the
module that owns the weight (``embedding_modules``): the GGUF writer copies them, since rounding the rounded weight
again is not the identity for the types with searched scales (Q3_K, Q4_K, Q5_K, Q6_K).
"""

from __future__ import annotations

import re

from hfquant.core.gguf_blocks import BLOCK_TYPES

_FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# gguf_type values that are llama.cpp mixes: name -> the block type it is built around.
MIXES = {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K"}
# The module-name suffixes of llama.cpp's tensor categories the mixes treat apart.
_ROLES = {"attn_v": ("v_proj", "qkv_proj"), "ffn_down": ("down_proj",), "attn_output": ("o_proj",)}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def base_type(gguf_type: str) -> str:
    """The block type a (possibly mixed) ``gguf_type`` is built around."""
    return MIXES.get(gguf_type, gguf_type)


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


def _role(name: str) -> str | None:
    leaf = name.rpartition(".")[2]
    return next((role for role, leaves in _ROLES.items() if leaf in leaves), None)


def _mix_rule(gguf_type: str, role: str | None, i: int, n: int) -> str | None:
    """The type llama.cpp's mix ``gguf_type`` gives the ``i``-th of ``n`` tensors of ``role`` (``None``: the base)."""
    if gguf_type == "Q4_K_M" and role in ("attn_v", "ffn_down") and use_more_bits(i, n):
        return "Q6_K"
    if gguf_type == "Q3_K_M":
        if role == "attn_v":
            return "Q5_K" if i < 2 else "Q4_K"
        if role == "ffn_down":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if role == "attn_output":
            return "Q4_K"
    return None


def module_types(modules: dict[str, int], gguf_type: str) -> dict[str, str]:
    """The GGUF type of each weight, ``modules`` being name -> row length (input features) in model order.

    ``attn_v`` tensors are counted in order, as llama.cpp counts them; an ``ffn_down``'s index is its layer's (from
    ``layers.<i>.`` in its name, of ``1 +`` the largest such index layers), which is llama.cpp's counter for dense
    models and its layer for MoE experts; a name without a layer index is counted in order."""
    base = base_type(gguf_type)
    roles = {name: _role(name) for name in modules}
    layers = {name: int(m.group(1)) for name in modules if (m := _LAYER.search(name))}
    counts = {role: sum(r == role for r in roles.values()) for role in _ROLES}
    n_layers = max(layers.values(), default=-1) + 1
    seen = dict.fromkeys(_ROLES, 0)
    out = {}
    for name, cols in modules.items():
        role = roles[name]
        i, n = (seen[role], counts[role]) if role else (0, 0)
        if role == "ffn_down" and name in layers:
            i, n = layers[name], n_layers
        if role:
            seen[role] += 1
        out[name] = fit_row(_mix_rule(gguf_type, role, i, n) or base, cols)
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
