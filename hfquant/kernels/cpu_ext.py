"""hfquant's own CPU kernels (``csrc/``: one file per kernel family, listed in ``csrc/common.h`` with what they share;
``csrc/ops.cpp`` registers them), built on first use into one module: the weight-only decode GEMV
described below, the weight-only prefill paths (tiles of W dequantized for torch's float32 GEMM; an int16-activation
GEMM), a W8A8 decode GEMV (AVX512-VNNI or AVX2), an exact int8 GEMM for W8A8 prefill on CPUs without VNNI
(``hfquant.kernels.w8a8``) and a GEMV for float32 weights stored in 16 bits (``hfquant.kernels.half``).

Why a hand-written kernel: torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) is limited by its
unpacking on these CPUs (about 16 GB/s of packed weights on an AVX-512 Xeon, under the memory bandwidth)
and rounds activations and scales to bf16. This one reads hfquant's packed bytes directly, applies each
group's scale and zero once per group (``s * (sum q*x - z * sum x)``), adds the bias, and keeps float32
accuracy. With AVX512-VNNI it multiplies the 4-bit codes with a three-part int8 split of ``x`` (about 21
bits of each 128-column block, relative error about 2e-6) in integer dot-product instructions; without VNNI
it converts codes to float32 and uses FMAs. It is compiled for the machine it runs on
(``-O3 -march=native``; on an AVX2 CPU, or with ``HFQUANT_ISA=avx2``, ``-march=haswell``: the 256-bit FMA loop and
an AVX2 W8A8 GEMV, see ``hfquant.kernels.isa``) with ``torch.utils.cpp_extension``, once per environment, into
hfquant's own folder for this torch, Python, compiler, flags, CPU and sources (``hfquant.kernels.jit_build``:
``~/.cache/hfquant/extensions/<name>-<key>``, ``$HFQUANT_CACHE`` moves it), under a lock that dies with its owner;
a build, or a wait for another process's, is announced at WARNING and its seconds are ``build_seconds()``. No
compiler, or a failed build: a warning once, and torch's int4 kernel is used instead. Each function is also a torch
operator (``torch.ops.hfquant_cpu.*``, used under ``torch.compile``: ``kernel``). ``HFQUANT_CPU_EXTENSION=0``
turns it off.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from hfquant.kernels.isa import cpu_isa
from hfquant.kernels.jit_build import build_seconds, load_extension

# Every file of csrc/ (the .cpp files are compiled, the headers copied along): all of them are in the build key.
CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")))
NAME = "hfquant_cpu"  # the module's name, and its operators' namespace (``torch.ops.hfquant_cpu``)
LABEL = "hfquant's CPU kernels"  # in the build and wait messages
_LOCK = threading.Lock()
_STATE: dict = {}


def extension():
    """The compiled module, or ``None`` when it is turned off or cannot be built."""
    if "ext" in _STATE:
        return _STATE["ext"]
    with _LOCK:
        if "ext" not in _STATE:
            _STATE["ext"] = _build()
    return _STATE["ext"]


def kernel(ext, name: str):
    """The extension's function ``name``: its Python binding in eager code (the least dispatch overhead), its
    torch operator ``torch.ops.<extension name>.<name>`` while ``torch.compile`` traces, so the call is
    recorded in the graph (a Meta implementation gives compile the output's shape) instead of breaking it."""
    if torch.compiler.is_compiling():
        return getattr(getattr(torch.ops, ext.__name__), name)
    return getattr(ext, name)


def compile_kernel(name: str = NAME, extra_cflags: tuple = ()):
    """Compile (or load the finished build from hfquant's extension folder) the kernel module. ``extra_cflags`` go
    after ``-march=native``: the tests build a ``-mno-avx512vnni`` copy to check the float32 FMA loop too."""
    return load_extension(name, SOURCES, ["-O3", "-march=native", "-fopenmp", *extra_cflags], LABEL)


def _build():
    if os.environ.get("HFQUANT_CPU_EXTENSION", "1") == "0":
        return None
    isa = cpu_isa()
    if isa == "other":
        return None
    try:
        ext = compile_kernel(f"{NAME}_avx2", ("-march=haswell",)) if isa == "avx2" else compile_kernel()
    except Exception as exc:  # noqa: BLE001 - no compiler, headers or ninja: fall back, say so once
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        hint = " (set HFQUANT_CACHE to a writable folder)" if isinstance(exc, PermissionError) else ""
        warnings.warn(f"hfquant: the CPU kernels extension could not be built ({type(exc).__name__}: {first}){hint}; "
                      "using torch's int4 kernel instead", RuntimeWarning, stacklevel=3)
        return None
    # Without AVX2 only the scalar loop is compiled, which is slower than torch's int4 kernel.
    return ext if ext.path() != "scalar" else None


__all__ = ["LABEL", "NAME", "SOURCES", "build_seconds", "compile_kernel", "extension", "kernel"]
