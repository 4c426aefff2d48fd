"""Per-module cache of kernel operands, rebuilt when a source tensor is replaced (not saved)."""

from __future__ import annotations

from typing import Callable


def cached_operands(module, name: str, tensors, build: Callable, extra=()):
    """``build()`` once per (data pointer and version counter of each of ``tensors``, ``extra``), stored in
    ``module._kernel_cache``: replacing a tensor or changing it in place (``load_state_dict`` copies into
    the existing tensors) rebuilds the operands."""
    key = [extra]
    for t in tensors:
        key.append(t.data_ptr())
        key.append(t._version)
    hit = module._kernel_cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, build())
        module._kernel_cache[name] = hit
    return hit[1]
