"""What the kernel families share: the reference switch, the timed and recorded choice of a CPU path
(``choose_path``), and the guarded Triton import (``triton_kernels``). The per-module operand cache and the
group-sorted packed weight live in ``hfquant.kernels.operands`` (still importable from here): the Triton kernels,
which ``triton_kernels()`` imports inside the function, take them from there, so no import cycle runs through this
module. Duck-typed: nothing here (or anywhere in ``hfquant.kernels``) imports ``hfquant.nn``; a quantized module is
anything with the tensors the kernels read."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from hfquant.kernels import choices as path_record
from hfquant.kernels.isa import cpu_isa
from hfquant.kernels.operands import cached_operands, grouped_weight  # noqa: F401 - importable from here as before


def forced_reference() -> bool:
    """``HFQUANT_KERNEL=reference`` (or ``hfquant.kernels.reference_kernels()``): every quantized Linear
    runs its exact reference."""
    return os.environ.get("HFQUANT_KERNEL", "auto") == "reference"


@contextlib.contextmanager
def reference_kernels():
    """Run quantized Linears on the exact float32 reference inside the block (``HFQUANT_KERNEL=reference``):
    for comparing formats or algorithms without the fast kernels' bf16 rounding."""
    old = os.environ.get("HFQUANT_KERNEL")
    os.environ["HFQUANT_KERNEL"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HFQUANT_KERNEL", None)
        else:
            os.environ["HFQUANT_KERNEL"] = old


SLOWER_THAN_FLOAT_MARGIN = 1.1  # warn when the chosen quantized path takes more than this times float32's time
# ... and float32 takes at least this long (below it, Python's dispatch decides, not the kernels)
SLOWER_THAN_FLOAT_MIN_SECONDS = 5e-4
_SLOWER_THAN_FLOAT_WARNED: set[str] = set()  # one warning per process and ``env`` (kernel family)

REPRODUCIBLE = "reproducible"  # the default: the machine's recorded choice, the same in every process
FASTEST = "fastest"  # opt-in: each process times every path itself; numbers then depend on which path wins
_MODE_ALIASES = {"auto": FASTEST, "default": REPRODUCIBLE}  # "auto": the per-process timed choice's old name


def path_mode(env: str, paths) -> str:
    """``os.environ[env]`` checked: ``"reproducible"`` (unset), ``"fastest"`` or the name of one of ``paths``."""
    mode = os.environ.get(env, "").strip().lower() or REPRODUCIBLE
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in (REPRODUCIBLE, FASTEST) and mode not in paths:
        raise ValueError(f"{env}={os.environ[env]!r}; expected {REPRODUCIBLE} (the default), {FASTEST} or one of "
                         f"{list(paths)}")
    return mode


@dataclass(frozen=True)
class PathFamily:
    """A kernel family whose path ``choose_path`` picks: the environment variable that sets the mode, the paths
    accurate enough to be a default (``candidates``), the ones taken only where no candidate takes the input
    (``fallback``), and how a slow layer is named in the warning (``warn_as``, or ``None``: no float32 timing)."""

    env: str
    candidates: tuple[str, ...]
    fallback: tuple[str, ...] = ()
    warn_as: str | None = None


def choose_path(family: PathFamily, choices: dict, key: tuple, paths: dict[str, Callable], x: torch.Tensor, module):
    """Run ``paths[name](x, module)`` for the path this process uses for the shape class ``key`` of the kernel
    ``family`` (its ``env``, ``candidates``, ``fallback`` and ``warn_as``); returns its output, or ``None`` when no path
    takes the input (a path returning ``None`` does not take it).

    Which path, by ``os.environ[family.env]`` (``path_mode``):

    * ``reproducible`` (the default): the fastest of ``candidates`` (the paths accurate enough to be a default) on
      this machine, timed once per machine and shape class by the first process that meets the class and recorded
      for every later process (``hfquant.kernels.choices``): one checkpoint gives bit-identical outputs in every
      process on the machine. Only where no candidate takes the input, the first of ``fallback`` that does (not
      timed, not recorded: it depends on the module, not on a timing).
    * ``fastest`` (opt-in; ``auto`` is its old name): every path, ``fallback`` included, is timed by each process on
      the class's first call, and the fastest is kept for the process; two processes can then take different paths
      and compute different numbers.
    * a path's name: that path.

    Timing: each path runs once to warm up, then the fastest of ``TIMED_CALLS`` calls counts. The choice is also kept
    in ``choices`` per mode and shape class (a module whose layout the class's path does not take gets the first
    candidate that takes it). While ``torch.compile`` traces nothing is timed and no file is read: the choice this
    process already made or read for the class, else the first candidate that takes the input (kept in ``choices``,
    so this process's eager calls then agree with the graph; run the model once eagerly before compiling to compile
    the machine's recorded path).

    ``warn_as`` (a description of the layer, formatted with ``bits``, ``in_f``, ``out_f`` and ``rows`` only when a
    warning is due): the timing also times float32 ``F.linear`` (``float_baseline``), and the ratio is recorded; when
    the chosen path is more than ``SLOWER_THAN_FLOAT_MARGIN`` times slower (and float32 takes at least
    ``SLOWER_THAN_FLOAT_MIN_SECONDS``), one warning per process and kernel family (``env``) says so, naming the first
    such layer: on such a CPU the quantized model saves memory, not time."""
    mode = path_mode(family.env, paths)
    if mode in paths:
        return paths[mode](x, module)
    slot = (mode, key)
    name = choices.get(slot)
    compiling = torch.compiler.is_compiling()
    if name is None and mode == REPRODUCIBLE:
        # Under torch.compile only what is already read is looked at (no file access while tracing).
        entry = path_record.peek(family.env, key) if compiling else path_record.recorded(family.env, key)
        if entry is not None:
            name = choices[slot] = entry["path"]
            if not compiling:
                _warn_if_slower(family, entry, mode, x, module)
    if name is not None:  # every call after a class's first: the remembered path
        y = paths[name](x, module) if name in paths else None
        if y is None:  # a module whose layout the class's path does not take (an unusual g_idx, say)
            y = _first_taking(paths, [*_pool(paths, family.candidates, mode), *family.fallback], x, module)[1]
        return y
    if compiling:  # nothing timed while tracing: the first candidate, kept for this process's eager calls too
        name, y = _first_taking(paths, _pool(paths, family.candidates, mode), x, module)
        if name is None:
            return _first_taking(paths, family.fallback, x, module)[1]
        choices[slot] = name
        return y
    return _time_and_keep(family, choices, slot, paths, x, module)


def _time_and_keep(family: PathFamily, choices: dict, slot: tuple, paths: dict[str, Callable], x: torch.Tensor,
                   module):
    """A shape class's first call in this process with nothing recorded: time the paths (``reproducible``: once per
    machine, recorded for every process; ``fastest``: for this process), keep the choice, return its output."""
    mode, key = slot
    pool = _pool(paths, family.candidates, mode)
    outputs: dict[str, torch.Tensor] = {}

    def decide() -> dict | None:
        timed = {n: _time_path(paths[n], x, module) for n in (pool + [f for f in family.fallback if f not in pool]
                                                                  if mode == FASTEST else pool)}
        taken = {n: t for n, t in timed.items() if t[1] is not None}
        if not taken:
            return None
        best = min(taken, key=lambda n: taken[n][0])
        outputs[best] = taken[best][1]
        ratio = None
        if family.warn_as is not None:
            float_seconds = _time_path(float_baseline(module), x, module)[0]
            if float_seconds >= SLOWER_THAN_FLOAT_MIN_SECONDS:
                ratio = float_seconds / max(taken[best][0], 1e-12)
        return {"path": best, "ratio": ratio}

    entry = path_record.record(family.env, key, decide) if mode == REPRODUCIBLE else decide()
    if entry is None:  # no candidate takes this module: the fallback, chosen by the module, never by a timing
        return _first_taking(paths, family.fallback, x, module)[1]
    choices[slot] = entry["path"]
    _warn_if_slower(family, entry, mode, x, module)
    y = outputs.get(entry["path"])
    return y if y is not None else paths[entry["path"]](x, module)  # recorded by another process meanwhile


def _pool(paths: dict[str, Callable], candidates, mode: str) -> list[str]:
    """The paths a choice is made among: every path with ``fastest``, else the ``candidates`` there are."""
    return [n for n in (list(paths) if mode == FASTEST else candidates) if n in paths]


def _warn_if_slower(family: PathFamily, entry: dict, mode: str, x: torch.Tensor, module) -> None:
    """The slower-than-float warning for ``entry`` (``{"path", "ratio"}``), once per process and family."""
    env, warn_as, ratio = family.env, family.warn_as, entry.get("ratio")
    if warn_as is None or ratio is None or env in _SLOWER_THAN_FLOAT_WARNED or ratio * SLOWER_THAN_FLOAT_MARGIN >= 1.0:
        return
    _SLOWER_THAN_FLOAT_WARNED.add(env)
    what = warn_as.format(bits=getattr(module, "bits", 8), in_f=module.in_features, out_f=module.out_features,
                          rows=x.numel() // max(1, x.shape[-1]))
    if x.device.type == "cuda":
        where, baseline = f"GPU ({torch.cuda.get_device_name(x.device)})", f"{str(x.dtype).removeprefix('torch.')} F.linear"
    else:
        where, baseline = f"CPU ({cpu_isa()}, torch {torch.backends.cpu.get_cpu_capability()})", "float32"
    warnings.warn(f"hfquant: on this {where} the quantized path for {what} ({entry['path']}, {mode}) ran at "
                  f"{ratio:.2f}x the speed of {baseline} (timed once; other layers are not reported); the quantized "
                  "model saves memory here, not time", RuntimeWarning, stacklevel=4)


def remembered_path(choices: dict, key: tuple, env: str, paths) -> str | None:
    """The path ``choose_path`` runs for the shape class ``key`` in the current mode of ``env`` (for reports), or
    ``None`` when the class has not been called yet."""
    mode = path_mode(env, paths)
    if mode in paths:
        return mode
    if (mode, key) in choices:
        return choices[(mode, key)]
    entry = path_record.recorded(env, key) if mode == REPRODUCIBLE else None
    return entry["path"] if entry else None


def _first_taking(paths: dict[str, Callable], order, x: torch.Tensor, module):
    """``(name, output)`` of the first path in ``order`` that takes the input, or ``(None, None)``."""
    for name in (n for n in order if n in paths):
        y = paths[name](x, module)
        if y is not None:
            return name, y
    return None, None


FLOAT_BASELINE_ROWS = 2048  # output rows of W dequantized for the CPU's float32 timing (bounded memory)


def float_baseline(module) -> Callable:
    """The float computation a quantized Linear replaces, for ``choose_path``'s timing: ``F.linear`` of ``x`` with the
    weight dequantized to ``x``'s dtype on the first (untimed) call. On the CPU a wide layer is dequantized only on its
    first ``FLOAT_BASELINE_ROWS`` output rows, and that slice is multiplied as many times as the layer has slices (the
    last one whole: a slight overestimate of float32's time); on a GPU the whole weight (one layer's, briefly)."""
    weight: list[torch.Tensor] = []

    def run(x: torch.Tensor, _module) -> torch.Tensor:
        if not weight:
            w = module.dequantize().float().to(device=x.device, dtype=x.dtype)
            weight.append(w[:FLOAT_BASELINE_ROWS].contiguous() if x.device.type == "cpu" else w)
        w = weight[0]
        slices = -(-module.out_features // w.shape[0])
        if slices == 1:
            return torch.nn.functional.linear(x, w)
        return torch.cat([torch.nn.functional.linear(x, w) for _ in range(slices)], dim=-1)
    return run


TIMED_CALLS = 2  # timed calls per path after the warm-up call; the fastest counts (one call alone was noisy)
CUDA_CALLS_PER_TIMING = 20  # on a GPU each timed call is the mean of this many launches between two synchronizations


def _time_path(fn: Callable, x: torch.Tensor, module) -> tuple[float, object]:
    """``(seconds of the fastest of TIMED_CALLS calls, an output)``: an untimed first call warms caches, builds
    operands (and autotunes Triton kernels). On a GPU the device is synchronized around each timed call, which is the
    mean of ``CUDA_CALLS_PER_TIMING`` launches (one kernel takes microseconds)."""
    y = fn(x, module)
    if y is None:
        return float("inf"), None
    cuda = x.device.type == "cuda"
    calls = CUDA_CALLS_PER_TIMING if cuda else 1
    best = float("inf")
    for _ in range(TIMED_CALLS):
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            y = fn(x, module)
        if cuda:
            torch.cuda.synchronize(x.device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best, y


_NO_TRITON_WARNED = False


def triton_kernels():
    """``hfquant.kernels.triton_kernels``, or ``None`` with one warning when Triton is not installed (quantized
    Linears on CUDA then run the reference: dequantize and ``F.linear``, correct but slower)."""
    global _NO_TRITON_WARNED
    try:
        # Imported on the first CUDA call: Triton is an optional dependency and never loads with ``import hfquant``.
        from hfquant.kernels import triton_kernels as module
    except ImportError as exc:
        if "triton" not in str(exc).lower():
            raise
        if not _NO_TRITON_WARNED:
            _NO_TRITON_WARNED = True
            warnings.warn(f"hfquant: Triton is not installed ({exc}); quantized Linears on CUDA use the reference "
                          "kernel (dequantize + matmul), which is slower: pip install triton", stacklevel=2)
        return None
    return module
