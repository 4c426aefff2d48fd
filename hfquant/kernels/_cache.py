"""Per-module cache of kernel operands, rebuilt when a tensor of the module is replaced (not saved)."""

from __future__ import annotations

from typing import Callable

import torch


def cached_operands(module, name: str, build: Callable, extra=()):
    """``build()`` once per state of the module's own tensors, stored in ``module._kernel_cache``.

    The state is the data pointer and version counter of every parameter and buffer the module holds
    directly: replacing a tensor (``m.scales.data = ...``) or changing one in place (``load_state_dict``
    copies into the existing tensors) rebuilds the operands on the next call. It is read from the module's
    ``_parameters``/``_buffers`` dicts (one comprehension, about 1 us) because this runs on every decode call.

    While ``torch.compile`` traces, operands built before (``prepare_model`` builds them at load) are taken as
    they are: data pointers cannot be traced, and the compiled graph keeps the tensors it was traced with.
    """
    if torch.compiler.is_compiling() and name in module._kernel_cache:
        return module._kernel_cache[name][1]
    key = [extra]
    key += [(t.data_ptr(), t._version) for t in module._parameters.values() if t is not None]
    key += [(t.data_ptr(), t._version) for t in module._buffers.values() if t is not None]
    hit = module._kernel_cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, build())
        module._kernel_cache[name] = hit
    return hit[1]
