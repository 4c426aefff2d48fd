"""Per-module cache of kernel operands, rebuilt when a source tensor is replaced (not saved)."""

from __future__ import annotations

from typing import Callable


def cached_operands(module, name: str, tensors, build: Callable, extra=()):
    """``build()`` once per (data pointers of ``tensors``, ``extra``); stored in ``module._kernel_cache``."""
    key = tuple(t.data_ptr() for t in tensors) + tuple(extra)
    hit = module._kernel_cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, build())
        module._kernel_cache[name] = hit
    return hit[1]
