"""The operands the kernels build from a quantized module, cached on it: the per-module operand cache
(``cached_operands``) and the packed codes with their columns sorted by group (``grouped_weight``). Imported by every
kernel family, the Triton kernels included, and importing no other kernel module: the bottom of ``hfquant.kernels``."""

from __future__ import annotations

from typing import Callable

import torch

from hfquant.core.packing import pack_codes


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


def grouped_weight(module):
    """``(packed, perm)``: the packed codes with their columns sorted by group, so every group is a
    contiguous run of ``group_size`` columns (the last may be partial), and the column permutation that
    does it (``None`` when ``g_idx`` is already ``i // group_size`` and ``packed`` is the module's own
    ``weight``). ``None`` when some group other than the last is not whole. Built once, shared by every
    fast path."""
    def build():
        g = module.in_features if module.group_size == -1 else module.group_size
        g_idx = module.g_idx.long()
        counts = torch.bincount(g_idx, minlength=module.scales.shape[1])
        if not (bool((counts[:-1] == g).all()) and 0 < int(counts[-1]) <= g):
            return None
        perm = torch.argsort(g_idx, stable=True)
        if bool((perm == torch.arange(module.in_features, device=perm.device)).all()):
            return module.weight, None
        return pack_codes(module.codes()[:, perm], module.bits), perm
    return cached_operands(module, "grouped", build)
