"""What the GGUF writer (``hfquant.formats.gguf``) and reader (``hfquant.formats.gguf_read``) share: the optional
``gguf`` package, the architectures they handle, llama.cpp's tensor names, and the rotary row order of GGUF
``llama``'s q/k projections (llama.cpp's, not HF's)."""

from __future__ import annotations

import torch

from hfquant.core.errors import FormatError

# HF model_type -> GGUF architecture (the Llama family).
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def gguf_package():
    """The ``gguf`` package; ``FormatError`` (one line) when it is not installed."""
    try:
        import gguf  # optional dependency: needed only to write GGUF files
    except ImportError:
        raise FormatError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


def name_map(gguf, arch: str, n_layers: int):
    """The gguf package's HF -> llama.cpp tensor names for GGUF architecture ``arch``."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_layers)


def rotary_heads(arch: str, module: str, heads: int, kv_heads: int) -> int | None:
    """The head count whose rotary row order differs between HF and llama.cpp for ``module`` (GGUF ``llama``'s q and
    k projections), else ``None``."""
    if arch != "llama":
        return None
    return heads if module.endswith("q_proj") else kv_heads if module.endswith("k_proj") else None


def permute_rows(rows: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """HF's rotary row order -> llama.cpp's (``inverse``: back), per head: rows ``(2, half)`` become ``(half, 2)``
    interleaved."""
    shape = rows.shape
    split = (2, shape[0] // n_head // 2)
    return rows.reshape(n_head, *(split[::-1] if inverse else split), *shape[1:]).swapaxes(1, 2).reshape(shape)
