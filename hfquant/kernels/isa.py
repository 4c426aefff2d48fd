"""Which x86 instruction set hfquant's CPU dispatch plans for, decided once per process.

``cpu_isa()`` is ``"avx512-vnni"``, ``"avx512"``, ``"avx2"`` or ``"other"``: the CPU's own (``torch.cpu``'s
cpuinfo checks), capped by what torch itself runs (``torch.backends.cpu.get_cpu_capability()``, which
``ATEN_CPU_CAPABILITY=avx2`` lowers) and by ``HFQUANT_ISA`` (``avx2``, ``avx512``, ``avx512-vnni``: emulate a
smaller CPU on a bigger one, as the tests and ``--isa avx2`` in the benchmarks do).

What depends on it:

* hfquant's C++ kernels are built for it (``cpu_ext``: ``-march=native``, or ``-march=haswell`` for AVX2);
* ``torch._int_mm`` is used for W8A8 only where it is fast: torch runs it through oneDNN only on CPUs with
  AVX512-VNNI, and elsewhere through a plain loop (measured on an AVX2-only EPYC: 173 s against 0.69 s for the
  float32 product of 512 x 4096 x 4096). ``int8_gemm_is_fast()`` says which.
"""

from __future__ import annotations

import functools
import os

import torch

ISAS = ("other", "avx2", "avx512", "avx512-vnni")  # ordered: each one includes the ones before


def _hardware() -> str:
    cpu = getattr(torch, "cpu", None)
    try:
        if cpu._is_avx512_supported():
            return "avx512-vnni" if cpu._is_vnni_supported() else "avx512"
        return "avx2" if cpu._is_avx2_supported() else "other"
    except AttributeError:  # an older torch without the cpuinfo helpers: its dispatch level instead
        cap = torch.backends.cpu.get_cpu_capability()
        return "avx512" if cap.startswith("AVX512") else "avx2" if cap == "AVX2" else "other"


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    """The instruction set hfquant plans for (see the module docstring)."""
    isa = _hardware()
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX2":
        isa = min(isa, "avx2", key=ISAS.index)
    elif not cap.startswith("AVX512"):
        isa = "other"
    forced = os.environ.get("HFQUANT_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"HFQUANT_ISA={forced!r}; expected one of {list(ISAS)} (or unset)")
        isa = min(isa, forced, key=ISAS.index)
    return isa


@torch.compiler.assume_constant_result  # a fact about the process: torch.compile reads it once while tracing
def int8_gemm_is_fast() -> bool:
    """Whether ``torch._int_mm`` on the CPU goes through oneDNN's int8 GEMM (AVX512-VNNI), not a plain loop."""
    return cpu_isa() == "avx512-vnni"
