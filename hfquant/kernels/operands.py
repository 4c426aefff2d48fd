"""The operands the kernels build from a quantized module, cached on it: the per-module operand cache
(``cached_operands``) and the packed codes with their columns sorted by group (``grouped_weight``). Imported by every
kernel family, the Triton kernels included, and importing no other kernel module: the bottom of ``hfquant.kernels``."""

from __future__ import annotations

from typing import Callable

import torch

from hfquant.core.packing import pack_codes, unpack_codes


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


INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 kernels (CPU and CUDA "tinygemm") take


def int4_kernel_group(group: int, k: int) -> int | None:
    """The group size torch's int4 kernels run with: the largest of ``INT4_KERNEL_GROUPS`` dividing both the
    quantization group and K (each quantization group is then several kernel groups sharing one scale and zero, and
    no padding is needed), else the quantization group itself when the kernels take it (the partial last group is
    then zero-padded), else ``None``."""
    for kg in INT4_KERNEL_GROUPS:
        if group % kg == 0 and k % kg == 0:
            return kg
    return group if group in INT4_KERNEL_GROUPS else None


def int4_kernel_inputs(module):
    """What torch's int4 kernels (``aten._weight_int4pack_mm`` on CUDA, ``..._for_cpu`` on the CPU) are packed from:
    ``(codes, scale_zero, perm, k_pad, kg)``, or ``None`` for a layout they cannot express (not 4-bit, a group size
    with no kernel group, groups that are not whole runs of columns).

    Both kernels compute ``w = (q - 8) * s + z`` per group of ``kg`` consecutive input columns, so the module's
    ``s * (q - zero)`` maps to ``z = (8 - zero) * s``; ``scale_zero`` is bfloat16 ``[k_pad / kg, N, 2]`` (scale, z),
    each quantization group's pair repeated for its kernel groups. ``codes`` int32 ``[N, k_pad]`` in group order
    (``perm``, as ``grouped_weight``), padded with code 8 (value ``z``, multiplied by the zero-padded ``x``).

    Not cached: ``codes`` is 4 bytes a weight, only read by the packing; the callers cache what they pack from it."""
    group = module.in_features if module.group_size == -1 else module.group_size
    kg = int4_kernel_group(group, module.in_features)
    grouped = grouped_weight(module) if module.bits == 4 else None
    if kg is None or grouped is None:
        return None
    packed_codes, perm = grouped
    k_pad = -(-module.in_features // kg) * kg
    codes = torch.full((module.out_features, k_pad), 8, dtype=torch.int32, device=packed_codes.device)
    codes[:, : module.in_features] = unpack_codes(packed_codes, 4, module.in_features)
    s = module.scales.float()
    z = (8 - module.zeros.float()) * s
    scale_zero = torch.stack([s.t(), z.t()], dim=-1).repeat_interleave(group // kg, dim=0)[: k_pad // kg]
    return codes, scale_zero.to(torch.bfloat16).contiguous(), perm, k_pad, kg
