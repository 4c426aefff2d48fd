"""Weight-only matmul (2/3/4/8-bit codes, float activations), dispatched at call time by device, dtype and shape.

Paths (``weight_only_linear`` picks one per call; ``HFQUANT_KERNEL=reference`` forces the first):

* **reference** -- the oracle every fast path is tested against: dequantize the whole weight in float32
  (``scale[g_idx] * (q - zero[g_idx])``, ``QuantLinearWeightOnly.dequantize``), cast it to ``x.dtype`` and call
  ``F.linear``. Used for layouts no fast path takes (2/3-bit codes, float16 on CPU, ...).
* **CPU, one row, float32** (decode): hfquant's own AVX-512 kernel (``hfquant.kernels.cpu_ext``): integer
  dot products (AVX512-VNNI) over a three-part int8 split of ``x``, or float32 FMAs without VNNI; float32-level
  accuracy (< 1e-5 relative to the reference in the tests, outlier channels included), bias added in the
  kernel. Its speed against float32 ``F.linear`` is in BENCHMARKS.md (``scripts/bench_kernels.py``).
* **CPU, two rows or more, float32** (prefill, batched decode), one of three, which compute different numbers. By
  default (``HFQUANT_CPU_PREFILL`` unset or ``reproducible``) the fastest on this machine of the two with float32-level
  accuracy, int16 and tiles (``PREFILL_CANDIDATES``), timed by the first process that meets a shape class (in, out,
  group, bits, rows rounded to a power of two) and recorded for every later one (``hfquant.kernels.choices``), so one
  checkpoint gives bit-identical logits in every process on a machine; torch's int4 kernel only where neither takes
  the module. ``fastest`` opts in to each process timing all three (numbers then depend on which wins); ``tiles``,
  ``int4`` or ``int16`` forces one (``hfquant.kernels.common.choose_path``):

  - ``tiles``: hfquant's kernel dequantizes tiles of W (about 16 MB of float32 each) with the reference's float
    ops and torch's float32 GEMM multiplies each tile (float32 rounding only; the GEMM's time plus a small
    dequantization);
  - ``int4``: torch's int4 kernel below (bf16 activations);
  - ``int16``: hfquant's 16-bit integer GEMM (``weight_only_cpu_int16_mm``): ``x`` rounded to int16 codes per row
    and group (15 bits of the group's largest value), exact int32 sums with the 4-bit codes (``VPMADDWD``, AVX2),
    per-group scales and zero points in float32 (tests: < 3e-5 relative, < 3e-4 with a 1000x outlier channel).

  Measured (``scripts/bench_kernels.py``, BENCHMARKS.md): on an AVX-512-BF16 EPYC the int4 kernel was fastest
  (1.6-3.8x float32 at 16-512 rows, the int16 GEMM 1.4-2.6x, the tiles 0.9-1.1x); with torch's AVX2 code the int16
  GEMM was fastest (1.3-2.7x, the int4 kernel 0.7-1.7x, the tiles 0.7-1.1x); on an AVX-512 Xeon (AMX) the int16 GEMM
  is fastest at 16 rows and the tiles from 64 rows, every path under float32's speed at 512 rows.
* **CPU, 8-bit codes, float32** (``bits: 8`` modules, e.g. an int8 ``lm_head`` or the 8-bit choices of
  ``bits: auto``): one row through the 4-bit decode kernel, each code byte read as two nibbles against ``x``
  spread to ``(x_k, 16 x_k)`` (``_ext_operands``); more rows through the same choice: the int16 GEMM or tiles
  dequantized by torch ops (codes one a byte, kernel groups of at most 256 columns: ``_int16_byte_operands``).
* **CPU** (otherwise: bfloat16 activations, or no extension):
  torch's int4 CPU kernel ``aten._weight_int4pack_mm_for_cpu``. Its fast (AVX-512) path takes bfloat16 activations, so ``x`` is
  cast to bf16 and the result back (about 3e-3 relative error against the float32 reference; the tests
  allow 1e-2). It dequantizes ``w = (q - 8) * s + z`` per group of ``group_size`` consecutive input
  columns, so our ``s * (q - zero)`` maps to ``z = (8 - zero) * s``. It needs groups of 32/64/128/256
  contiguous columns: a quantization group that is a multiple of one of those runs as several kernel
  groups sharing its scale (so SmolLM2's 576 columns at g128 run as nine groups of 64, without padding;
  per-channel ``-1`` works when K is a multiple of 32); otherwise a partial last group is zero-padded
  (``x`` too). Act-order checkpoints (non-monotone ``g_idx``) have their columns permuted once so each
  group is contiguous, and ``x``'s columns are gathered the same way per call.
* **CUDA**: the faster of torch's int4 kernel ("tinygemm", bfloat16 activations) and hfquant's Triton kernels,
  timed per shape class and recorded (``hfquant.kernels.cuda_paths``).

Operands of the fast paths are built once per module -- ``prepare_module`` does it at load time (the
quantizer calls it), or the first call does -- and cached on the module (not saved). The CPU int4 operand
is a second copy of the packed weight in the kernel's own layout (0.5 byte per weight).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hfquant.core.packing import _LITTLE_ENDIAN
from hfquant.kernels import cpu_ext
from hfquant.kernels.common import choose_path, forced_reference, PathFamily
from hfquant.kernels.cuda_paths import weight_only_cuda
from hfquant.kernels.operands import cached_operands, grouped_weight, int4_kernel_inputs

_CPU_DTYPES = (torch.float32, torch.bfloat16)
# hfquant's AVX-512 GEMV (csrc) reads W once per row of x: it is the fastest path for a single float32 row
# (decode); from two rows the prefill choice (``weight_only_cpu_prefill``), which reads W once for all rows, takes
# over.
CPU_GEMV_MAX_ROWS = 1
# Rows of W per dequantized tile: about 16 MB of float32 (4096 columns: 1024 rows).
DEQUANT_TILE_BYTES = 16 << 20


def weight_only_reference(x: torch.Tensor, module) -> torch.Tensor:
    """``x @ dequantize(W)^T + b`` with the weight dequantized in float32 and cast to ``x.dtype``."""
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, module.dequantize(torch.float32).to(x.dtype), bias)


def _cpu_int4_operands(module):
    """(packed int4 weight, bf16 scale/zero table, column perm or None, padded K, kernel group), or None."""
    def build():
        inputs = int4_kernel_inputs(module)
        if inputs is None or module.out_features % 16:
            return None  # the kernel's packing needs N divisible by 16
        codes, scale_zero, perm, k_pad, kg = inputs
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scale_zero, perm, k_pad, kg
    return cached_operands(module, "cpu_int4", build)


def weight_only_cpu_int4(x: torch.Tensor, module) -> torch.Tensor | None:
    """Torch's int4 CPU kernel (bf16 activations), or ``None`` when the layout does not allow it."""
    ops = _cpu_int4_operands(module)
    if ops is None:
        return None
    packed, scale_zero, perm, k_pad, kg = ops
    x2 = _rows(x, perm)
    if k_pad != x2.shape[1]:
        x2 = F.pad(x2, (0, k_pad - x2.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, kg, scale_zero)
    return _finish(y.to(x.dtype), x, module)


def _rows(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``x`` as ``[rows, K]``, its columns in the operands' (group-sorted) order."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if perm is None else x2.index_select(1, perm)


def _finish(y: torch.Tensor, x: torch.Tensor, module) -> torch.Tensor:
    """Add the bias in place and give ``y`` ``x``'s leading dimensions."""
    if module.bias is not None:
        y += module.bias
    return y.view(*x.shape[:-1], module.out_features)


class ExtOperands(NamedTuple):
    """The operands of hfquant's CPU kernels for one module (``_ext_operands``)."""

    codes: torch.Tensor  # packed bytes, uint8 [N, KB]
    scales: torch.Tensor  # float32 [N, G]
    zeros: torch.Tensor  # float32 [N, G] (divided by 17 when ``spread``)
    perm: torch.Tensor | None  # column permutation into group order, or None
    group: int  # kernel group width (in spread columns when ``spread``)
    bias: torch.Tensor | None  # float32 [N] or None
    spread: bool  # 8-bit codes: the kernel reads x spread to (x_k, 16 x_k)


def _ext_operands(module) -> ExtOperands | None:
    """The module's ``ExtOperands``, or None when the layout does not allow hfquant's kernels.

    8-bit codes run through the 4-bit kernel: a code byte ``q = lo + 16 * hi`` is read as two nibbles, so the
    kernel gets ``x`` spread to ``2K`` columns ``(x_k, 16 x_k)`` (``spread`` is True), groups of ``2 * group``
    spread columns, and ``zeros / 17`` (each spread group's sum of ``x`` is 17 times the group's sum):
    ``s * (lo x + hi 16x - z/17 * 17 sum x) = s * sum (q - z) x``."""
    def build():
        group = module.in_features if module.group_size == -1 else module.group_size
        spread = module.bits == 8
        if spread and module.group_size == -1:
            group = -(-module.in_features // 16) * 16  # one group: any width >= K that the kernel takes
        if not (_LITTLE_ENDIAN and module.bits in (4, 8) and group % (16 if spread else 32) == 0):
            return None
        grouped = grouped_weight(module)
        if grouped is None:
            return None
        packed, perm = grouped
        as_bytes = packed.contiguous().view(torch.uint8).reshape(module.out_features, -1)
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        zeros = module.zeros.float() / 17 if spread else module.zeros.float()
        return ExtOperands(as_bytes, module.scales.float().contiguous(), zeros.contiguous(), perm,
                           2 * group if spread else group, bias, spread)
    return cached_operands(module, "cpu_ext", build)


def _extension(module) -> tuple | None:
    """(hfquant's compiled CPU extension, the module's ``ExtOperands``), or ``None`` when the extension is not
    built or the layout does not allow it."""
    ext = cpu_ext.extension()
    ops = _ext_operands(module) if ext is not None else None
    return None if ops is None else (ext, ops)


def _kernel_input(x: torch.Tensor, ops: ExtOperands) -> torch.Tensor:
    """``x`` contiguous with its columns in the operands' order, spread to ``(x_k, 16 x_k)`` for 8-bit codes."""
    x = x if ops.perm is None else x.index_select(-1, ops.perm)
    return (torch.stack((x, x * 16), dim=-1).flatten(-2) if ops.spread else x).contiguous()


def weight_only_cpu_gemv(x: torch.Tensor, module) -> torch.Tensor | None:
    """hfquant's CPU kernel for few rows (``hfquant.kernels.cpu_ext``; bias added in the kernel), or ``None``
    when it is not built or the layout does not allow it."""
    found = _extension(module)
    if found is None:
        return None
    ext, ops = found
    return cpu_ext.kernel(ext, "weight_only_gemv")(_kernel_input(x, ops), ops.codes, ops.scales, ops.zeros,
                                                   ops.bias, ops.group)


def weight_only_cpu_dequant_mm(x: torch.Tensor, module, tile: int | None = None) -> torch.Tensor | None:
    """Many rows of float32 ``x`` (prefill): tiles of ``tile`` rows of W dequantized with the reference's float
    ops, each multiplied with torch's float32 GEMM -- by hfquant's kernel for 4-bit codes, by torch ops for
    8-bit codes (their bytes are the codes). ``None`` when the extension is not built or the layout does not
    allow it."""
    found = _extension(module)
    if found is None:
        return None
    ext, ops = found
    tile = tile or max(64, DEQUANT_TILE_BYTES // (4 * module.in_features))
    if ops.spread:
        return _byte_codes_mm(x, module, ops, tile)
    return cpu_ext.kernel(ext, "weight_only_dequant_mm")(_kernel_input(x, ops), ops.codes, ops.scales, ops.zeros,
                                                         ops.bias, ops.group, tile)


def weight_only_cpu_int16_mm(x: torch.Tensor, module) -> torch.Tensor | None:
    """Many rows of float32 ``x``: hfquant's 16-bit integer GEMM (``x`` rounded to int16 codes per row and group,
    15 bits of the group's largest value; exact int32 sums with the 4-bit or 8-bit codes, ``VPMADDWD``; per-group
    scales in float32). ``None`` where the extension or this kernel is not built or the layout does not allow it."""
    found = _extension(module)
    if found is None or not hasattr(found[0], "weight_only_int16_mm"):
        return None
    ext, ops = found
    if not ops.spread:
        return cpu_ext.kernel(ext, "weight_only_int16_mm")(_kernel_input(x, ops), ops.codes, ops.scales, ops.zeros,
                                                           ops.bias, ops.group, 4)
    byte_ops = _int16_byte_operands(module)
    if byte_ops is None:
        return None
    scales, zeros, group = byte_ops
    return cpu_ext.kernel(ext, "weight_only_int16_mm")(_rows(x, ops.perm).contiguous(), ops.codes, scales, zeros,
                                                       ops.bias, group, 8).view(*x.shape[:-1], module.out_features)


def _int16_byte_operands(module):
    """8-bit codes for ``weight_only_int16_mm``: (float32 scales and zeros per kernel group, kernel group), or None.
    The kernel's groups are at most 256 columns (its int32 sums stay exact, and ``x`` gets a scale per kernel group):
    a quantization group is split into equal kernel groups sharing its scale and zero (per-channel ``-1``: groups
    of 128, the last partial)."""
    def build():
        k = module.in_features
        if module.group_size == -1:
            kg = 128
        else:
            kg = next((g for g in range(256, 0, -32) if module.group_size % g == 0), None)
            if kg is None:
                return None
        per = 1 if module.group_size == -1 else module.group_size // kg
        n_groups = -(-k // kg)
        expand = (lambda t: t.float().expand(-1, n_groups)) if module.group_size == -1 else (
            lambda t: t.float().repeat_interleave(per, dim=1)[:, :n_groups])
        return expand(module.scales).contiguous(), expand(module.zeros).contiguous(), kg
    return cached_operands(module, "cpu_int16_bytes", build)


def _byte_codes_mm(x: torch.Tensor, module, ops: ExtOperands, tile: int) -> torch.Tensor:
    """``weight_only_cpu_dequant_mm`` for 8-bit codes: ``(q - z) * s`` per tile of rows (as the reference), then
    ``F.linear``."""
    k, n = module.in_features, module.out_features
    group = k if module.group_size == -1 else module.group_size
    x2 = _rows(x, ops.perm)
    scales, zeros = module.scales.float(), module.zeros.float()
    y = x2.new_empty(x2.shape[0], n)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        # Columns are in group order (``grouped_weight``), so groups are runs of ``group`` columns; one group
        # per row broadcasts.
        s, z = scales[n0:n1], zeros[n0:n1]
        if s.shape[1] > 1:
            s, z = (t.repeat_interleave(group, dim=1)[:, :k] for t in (s, z))
        y[:, n0:n1] = F.linear(x2, (ops.codes[n0:n1, :k].float() - z) * s)
    return _finish(y, x, module)


_PREFILL_CHOICE: dict[tuple, str] = {}  # (mode, shape class) -> "int16", "tiles" or "int4", decided once per process
# The reproducible choice (``HFQUANT_CPU_PREFILL`` unset) is the fastest of these on this machine, timed once per machine
# and recorded (``hfquant.kernels.choices``): both keep float32-level accuracy (tiles: float32 rounding; int16: within
# 3e-5 of the reference). Which wins depends on the CPU: at 512 rows the int16 GEMM was 1.4-2.6x float32 on an
# AVX-512 EPYC and 0.6x on an AVX-512 Xeon (tiles: 0.9-1.1x on both). Torch's int4 kernel rounds x to bf16 (about
# 3e-3): it runs by default only where neither takes the module (no extension), and is timed with
# ``HFQUANT_CPU_PREFILL=fastest``.
PREFILL_CANDIDATES = ("int16", "tiles")
PREFILL_FALLBACK = ("int4",)
_PREFILL_FAMILY = PathFamily("HFQUANT_CPU_PREFILL", PREFILL_CANDIDATES, PREFILL_FALLBACK,
                             warn_as="a W{bits}A16 {in_f}x{out_f} Linear at {rows} rows")


def _prefill_paths():
    return {"tiles": weight_only_cpu_dequant_mm, "int4": weight_only_cpu_int4, "int16": weight_only_cpu_int16_mm}


def weight_only_cpu_prefill(x: torch.Tensor, module) -> torch.Tensor | None:
    """Many float32 rows: hfquant's int16 GEMM, the dequantized tiles or torch's int4 kernel, as ``HFQUANT_CPU_PREFILL``
    says (``hfquant.kernels.common.choose_path``: by default this machine's recorded choice among
    ``PREFILL_CANDIDATES``, the same in every process; ``fastest``: each process times all three); ``None`` when none
    takes it."""
    rows = x.numel() // max(1, x.shape[-1])
    key = (module.in_features, module.out_features, module.group_size, module.bits, rows.bit_length())
    return choose_path(_PREFILL_FAMILY, _PREFILL_CHOICE, key, _prefill_paths(), x, module)


def prepare_module(module) -> None:
    """Build the operands of the fast paths this module's device uses (called once at load time)."""
    if module.weight.device.type == "cpu":
        _cpu_int4_operands(module)
        if cpu_ext.extension() is not None:
            _ext_operands(module)


def weight_only_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Dispatch by device, dtype and shape (see the module docstring)."""
    if forced_reference():
        return weight_only_reference(x, module)
    device = x.device.type
    if device == "cuda":
        y = weight_only_cuda(x, module)
        return y if y is not None else weight_only_reference(x, module)
    if device == "cpu" and x.dtype in _CPU_DTYPES and module.weight.device.type == "cpu":
        rows = x.numel() // max(1, x.shape[-1])
        if x.dtype is torch.float32:
            y = weight_only_cpu_gemv(x, module) if rows <= CPU_GEMV_MAX_ROWS else None
            if y is None:  # more rows, or no GEMV here (no extension: then the timed choice is torch's int4 kernel)
                y = weight_only_cpu_prefill(x, module)
            if y is not None:
                return y
        y = weight_only_cpu_int4(x, module)
        if y is not None:
            return y
    return weight_only_reference(x, module)
