"""The paths a quantized Linear takes on CUDA, chosen per shape class by timing, as on the CPU.

A quantized model has to be faster than the float one, or the user has to be told: on an H200 hfquant's own Triton
W4A16 kernels ran at 0.3-0.9x bf16 ``F.linear``. So on CUDA the maintained kernels are candidates first, and
``hfquant.kernels.common.choose_path`` times them per shape class (GPU name, in, out, group, bits, dtype, rows
rounded to a power of two), records the choice for every later process on the machine
(``hfquant.kernels.choices``; the same checkpoint then computes the same numbers in every process), and warns once
when the chosen path is slower than ``F.linear`` on the de-quantized weight in the activations' dtype.

W4A16 (``HFQUANT_CUDA_W4A16``: unset / ``reproducible``, ``fastest``, or a path's name):

* ``tinygemm`` -- torch's int4 kernel ``aten._weight_int4pack_mm`` (the kernel torchao's int4 weight-only
  quantization runs; in every CUDA build of torch, sm80 and newer). Operands repacked once per module at the first
  call (``aten._convert_weight_to_int4pack``; a second copy of the codes, 0.5 byte per weight, beside the module's own,
  which ``save_pretrained`` keeps writing unchanged): ``w = (q - 8) * s + z`` with bfloat16 ``s`` and ``z = (8 - zero) *
  s`` per kernel group of 32-256 columns (``hfquant.kernels.operands.int4_kernel_inputs``: symmetric and asymmetric
  grids, any group that is a multiple of 32 or one of 32-256 with a zero-padded last group, act-order with static
  groups through a column permutation of ``x``). It takes bfloat16 activations only (its kernel's one dtype) and
  ``N`` a multiple of 8; rounding the scales and zero points to bfloat16 changes outputs by about as much as the
  reference's own rounding of the weight to bfloat16 (tests: 1e-2 relative).
* ``triton`` -- hfquant's Triton GEMV / GEMM (``hfquant.kernels.triton_kernels``): float16, bfloat16 and float32,
  groups that are powers of two >= 32.

W8A8 (``HFQUANT_CUDA_W8A8``):

* ``int_mm`` -- cuBLASLt's int8 GEMM (``torch._int_mm``) between the fused Triton row quantization and epilogue (more
  than 16 rows; K and N multiples of 8);
* ``triton`` -- hfquant's fused int8 GEMM. Both accumulate exactly in int32 and share the epilogue's arithmetic.

Marlin-class kernels (gptqmodel, vLLM) are not dispatched: neither package is on the GPU image this project's checks
run on, and their wheels are larger than what can be carried there, so a path through them could not be tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfquant.kernels.common import choose_path, PathFamily, triton_kernels
from hfquant.kernels.operands import cached_operands, int4_kernel_inputs

TINYGEMM_INNER_K_TILES = (8, 4, 2)  # the packing's inner k-tiles, widest first (16 columns each)

W4A16_FAMILY = PathFamily("HFQUANT_CUDA_W4A16", ("tinygemm", "triton"),
                          warn_as="a W{bits}A16 {in_f}x{out_f} Linear at {rows} rows")
W8A8_FAMILY = PathFamily("HFQUANT_CUDA_W8A8", ("int_mm", "triton"), warn_as="a W8A8 {in_f}x{out_f} Linear at {rows} rows")
_W4A16_CHOICE: dict[tuple, str] = {}
_W8A8_CHOICE: dict[tuple, str] = {}


def tinygemm_prepack(codes: torch.Tensor) -> torch.Tensor:
    """int32 codes ``[N, K]`` (0..15, K even) as the uint8 ``[N, K / 2]`` that ``_convert_weight_to_int4pack`` reads:
    column ``2i`` in the high nibble of byte ``i``, column ``2i + 1`` in the low one."""
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()


def tinygemm_inner_k_tiles(k_pad: int) -> int:
    """The widest inner k-tiling the packing allows for ``k_pad`` columns (a multiple of 32, so at least 2)."""
    return next(t for t in TINYGEMM_INNER_K_TILES if k_pad % (16 * t) == 0)


def _tinygemm_operands(module, device: torch.device):
    """(packed int32 tiles, bf16 scale/zero table, column perm or None, padded K, kernel group), or None."""
    def build():
        inputs = int4_kernel_inputs(module)
        if inputs is None or module.out_features % 8:
            return None
        codes, scale_zero, perm, k_pad, kg = inputs
        prepacked = tinygemm_prepack(codes).to(device)
        packed = torch.ops.aten._convert_weight_to_int4pack(prepacked, tinygemm_inner_k_tiles(k_pad))
        return packed, scale_zero.to(device), None if perm is None else perm.to(device), k_pad, kg
    return cached_operands(module, "tinygemm", build, extra=(str(device),))


def weight_only_tinygemm(x: torch.Tensor, module) -> torch.Tensor | None:
    """``x @ W^T (+ b)`` through torch's int4 CUDA kernel; ``None`` for activations other than bfloat16 or a layout
    the kernel cannot take."""
    if x.dtype is not torch.bfloat16:
        return None
    ops = _tinygemm_operands(module, x.device)
    if ops is None:
        return None
    packed, scale_zero, perm, k_pad, kg = ops
    x2 = x.reshape(-1, x.shape[-1])
    if perm is not None:
        x2 = x2.index_select(1, perm)
    if k_pad != x2.shape[1]:
        x2 = F.pad(x2, (0, k_pad - x2.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, kg, scale_zero)
    if module.bias is not None:
        y += module.bias.to(y.dtype)
    return y.view(*x.shape[:-1], module.out_features)


def _triton_path(name: str):
    """The path that calls ``hfquant.kernels.triton_kernels.<name>``, or declines (``None``) without Triton."""
    def run(x: torch.Tensor, module) -> torch.Tensor | None:
        kernels = triton_kernels()
        return getattr(kernels, name)(x, module) if kernels is not None else None
    return run


_triton_weight_only = _triton_path("weight_only_triton")
_triton_w8a8 = _triton_path("w8a8_triton")
_int_mm_w8a8 = _triton_path("w8a8_int_mm_cuda")  # cuBLASLt's GEMM between the Triton quantization and epilogue


_GPU_NAMES: dict[int, str] = {}  # device index -> name, read once (a dict lookup is all torch.compile traces)


def _gpu_name(device: torch.device) -> str:
    index = device.index or 0
    name = _GPU_NAMES.get(index)
    if name is None and not torch.compiler.is_compiling():
        name = _GPU_NAMES[index] = torch.cuda.get_device_name(index)
    return name or "cuda"


def _shape_class(x: torch.Tensor, module, bits: int, group: int) -> tuple:
    rows = x.numel() // max(1, x.shape[-1])
    return (_gpu_name(x.device), module.in_features, module.out_features, group, bits, str(x.dtype).removeprefix("torch."),
            rows.bit_length())


def _w4a16_paths():
    return {"tinygemm": weight_only_tinygemm, "triton": _triton_weight_only}


def _w8a8_paths():
    return {"int_mm": _int_mm_w8a8, "triton": _triton_w8a8}


def weight_only_cuda(x: torch.Tensor, module) -> torch.Tensor | None:
    """A W4A16 module on CUDA through the path chosen for its shape class (see the module docstring); ``None`` when
    no path takes it (the caller runs the reference)."""
    key = _shape_class(x, module, module.bits, module.group_size)
    return choose_path(W4A16_FAMILY, _W4A16_CHOICE, key, _w4a16_paths(), x, module)


def w8a8_cuda(x: torch.Tensor, module) -> torch.Tensor | None:
    """A W8A8 module on CUDA through the path chosen for its shape class; ``None`` when no path takes it."""
    return choose_path(W8A8_FAMILY, _W8A8_CHOICE, _shape_class(x, module, 8, -1), _w8a8_paths(), x, module)
