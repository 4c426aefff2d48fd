"""What the GGUF writer (``hfquant.formats.gguf``) and reader (``hfquant.formats.gguf_read``) share: the optional
``gguf`` package, the architectures they handle, llama.cpp's tensor names, and the tensor conventions llama.cpp's
converter applies per architecture (the rotary row order of q/k, RMSNorm weights stored as ``w + 1``)."""

from __future__ import annotations

import torch

from hfquant.core.errors import FormatError

# HF model_type -> GGUF architecture (llama.cpp's converter makes the same choice; Mistral and Mixtral are GGUF
# ``llama``, the latter with experts).
ARCHS = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "granite": "granite", "qwen2": "qwen2",
         "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3", "phi3": "phi3"}
# GGUF architectures whose q/k rows llama.cpp stores in its interleaved rotary order (its converter permutes them
# from HF's; the others run HF's split-half order, llama.cpp's NEOX rope).
_PERMUTED = {"llama", "granite"}
# GGUF architectures whose RMSNorm weights llama.cpp stores as ``w + 1`` (HF keeps Gemma's zero-centred weight and
# computes ``x * (1 + w)``; transformers' GGUF loader subtracts the 1 again).
NORM_SHIFTED = {"gemma3"}


def gguf_package():
    """The ``gguf`` package; ``FormatError`` (one line) when it is not installed."""
    try:
        import gguf  # optional dependency: needed only to write GGUF files
    except ImportError:
        raise FormatError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


def model_arch(gguf, arch: str):
    """The gguf package's ``MODEL_ARCH`` member named ``arch`` (e.g. ``"qwen2moe"``)."""
    for member, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return member
    raise FormatError(f"GGUF architecture {arch!r} is unknown to the installed gguf package; upgrade it "
                      "(pip install -U gguf)")


def name_map(gguf, arch: str, n_layers: int):
    """The gguf package's HF -> llama.cpp tensor names for GGUF architecture ``arch``."""
    return gguf.get_tensor_name_map(model_arch(gguf, arch), n_layers)


def rotary_heads(arch: str, module: str, heads: int, kv_heads: int) -> int | None:
    """The head count whose rotary row order differs between HF and llama.cpp for ``module`` (the q and k
    projections of GGUF ``llama`` and ``granite``), else ``None``."""
    if arch not in _PERMUTED:
        return None
    return heads if module.endswith("q_proj") else kv_heads if module.endswith("k_proj") else None


def permute_rows(rows: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """HF's rotary row order -> llama.cpp's (``inverse``: back), per head: rows ``(2, half)`` become ``(half, 2)``
    interleaved."""
    shape = rows.shape
    split = (2, shape[0] // n_head // 2)
    return rows.reshape(n_head, *(split[::-1] if inverse else split), *shape[1:]).swapaxes(1, 2).reshape(shape)
