"""The CPU path each kernel family takes for each shape class, recorded once per machine and reused by every process.

Several CPU paths can run one quantized Linear, and which is fastest depends on the CPU (hfquant's int16 GEMM is
1.4-2.6x float32 at 512 rows on an AVX-512 EPYC and 0.6x on an AVX-512 Xeon, where the dequantized tiles are
0.9x), so the choice is timed. The paths sum in different orders, so two processes that time differently would
compute different logits for one checkpoint. Hence the record: the first process on a machine that meets a shape
class times the candidates and writes its choice to a JSON file; every later process reads it, and takes the same
path, so the same checkpoint gives bit-identical logits in every process on the machine.

* **File**: ``$HFQUANT_CPU_CHOICES`` if set, else ``<hfquant's cache>/cpu-paths/<machine>.json`` (the cache folder
  of ``hfquant.kernels.jit_build``), ``<machine>`` a hash of what the timing and the numerics depend on: the CPU's
  model and flags, the instruction set hfquant plans for, torch's version and its thread count, and the kernels'
  source. Entries: ``"<family>|<shape class>"`` -> ``{"path", "ratio"}`` (``ratio``: float32's time over the
  path's, for the slower-than-float warning).
* **Concurrency**: the first timing of a class holds an ``flock`` on ``<file>.lock`` (released by the kernel when its
  owner dies); a process that waited reads what the other recorded. The file is replaced atomically.
* **Where it cannot be written** (a read-only cache): the choice is kept for the process only, with one warning
  (then two processes may differ).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path

import torch

from hfquant.kernels.cpu_ext import SOURCES
from hfquant.kernels.isa import cpu_isa
from hfquant.kernels.jit_build import cache_root, cpu_description, exclusive_lock

# What the recorded paths compute: every C++ source (cpu_ext.SOURCES) and the Python that calls them.
_KERNEL_SOURCES = (*SOURCES, *(Path(__file__).parent / name for name in ("weight_only.py", "w8a8.py", "half.py",
                                                                           "cuda_paths.py", "triton_kernels.py")))
_THREADS = threading.RLock()
_STATE: dict = {}  # "file" -> Path, "entries" -> dict, "unwritable" -> bool


@functools.lru_cache(maxsize=1)
def _sources_hash() -> str:
    h = hashlib.sha256()
    for path in _KERNEL_SOURCES:
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:16]


def machine_key() -> str:
    """What a recorded choice depends on (see the module docstring), hashed."""
    fields = {"cpu": cpu_description(), "isa": cpu_isa(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "kernels": _sources_hash()}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def record_file() -> Path:
    """The JSON file of this machine's recorded choices (see the module docstring)."""
    forced = os.environ.get("HFQUANT_CPU_CHOICES")
    if forced:
        return Path(forced).expanduser()
    return cache_root() / "cpu-paths" / f"{machine_key()}.json"


def _entry_name(family: str, key: tuple) -> str:
    return f"{family}|{','.join(map(str, key))}"


def _read(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entries() -> dict:
    """The record of the current file, read once per process (and again when the file setting changes)."""
    file = record_file()
    if _STATE.get("file") != file:
        _STATE.update(file=file, entries=_read(file), unwritable=False)
    return _STATE["entries"]


def _valid(entry) -> dict | None:
    return entry if isinstance(entry, dict) and isinstance(entry.get("path"), str) else None


def recorded(family: str, key: tuple) -> dict | None:
    """The recorded ``{"path", "ratio"}`` of ``family`` for the shape class ``key``, or ``None``."""
    return _valid(_entries().get(_entry_name(family, key)))


def peek(family: str, key: tuple) -> dict | None:
    """``recorded`` without touching the file (a plain dict lookup, which ``torch.compile`` can trace): ``None`` until
    this process has read the record."""
    return _valid(_STATE.get("entries", {}).get(_entry_name(family, key)))


def record(family: str, key: tuple, decide) -> dict | None:
    """The recorded entry of ``family`` for ``key``; when there is none, ``decide()`` (which times the candidates and
    returns ``{"path", "ratio"}``, or ``None`` when no candidate takes the input: nothing is recorded) runs under the
    file's lock, unless another process recorded one meanwhile, and its entry is written for every later process."""
    with _THREADS:
        entry = recorded(family, key)
        if entry is not None:
            return entry
        file = record_file()
        with contextlib.suppress(OSError):  # an unwritable folder: no lock, and ``_write`` warns
            file.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(Path(f"{file}.lock")):
            fresh = _read(file)  # what other processes recorded since this one read the file
            _entries().update(fresh)
            entry = recorded(family, key)
            if entry is not None:
                return entry
            entry = decide()
            if entry is None:
                return None
            _entries()[_entry_name(family, key)] = entry
            _write(file, {**fresh, _entry_name(family, key): entry})
        return entry


def _write(file: Path, entries: dict) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if not _STATE.get("unwritable"):
            _STATE["unwritable"] = True
            warnings.warn(f"hfquant: cannot write the CPU path record {str(file)!r} ({exc.strerror}); the choices hold "
                          "for this process only, so another process may take other paths (other numbers): set "
                          "HFQUANT_CPU_CHOICES to a writable file", RuntimeWarning, stacklevel=4)
