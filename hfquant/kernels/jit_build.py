"""Where and how hfquant's C++ extensions are compiled: one folder per environment, one builder at a time.

torch's own cache (``~/.cache/torch_extensions/py311_cpu/<name>``) is one folder per extension name for every
environment on the machine. Two virtualenvs then rebuild it in turn (torch's generated ``build.ninja`` names the
torch and Python include paths and the source's path, so ninja sees a changed command), and a process of one waits
silently on the other's build lock, forever when that build was killed (torch's ``FileBaton`` is a file that only
its owner removes). Here instead:

* **Folder**: ``<cache>/extensions/<name>-<key>``, ``<cache>`` = ``$HFQUANT_CACHE``, else
  ``$XDG_CACHE_HOME/hfquant``, else ``~/.cache/hfquant``. ``key`` hashes everything the compiled library depends on
  (``key_fields``): torch's version and install path, the Python ABI (``sys.implementation.cache_tag``, the
  extension suffix, the include path), the compiler (``$CXX``), the flags (which ``cpu_isa()`` chose, with the
  name), the sources' content (every file: the ``.cpp`` files and the headers they include, ``sources_text``), and
  with ``-march=native`` the CPU's model and feature flags (what the code is compiled for; the folder may sit on a
  home directory shared by different machines). The sources are copied into the folder and compiled from there, so
  two checkouts of the same sources share the build.
* **Lock**: ``fcntl.flock`` on ``<folder>.lock`` around the build and the load (the holder's pid is written in
  it for the message). The kernel releases it when its owner dies, so it is never stale; and since every live
  builder holds it, torch's ``<folder>/lock`` found by the holder is a killed build's leftover and is removed.
* **Messages**: "building ... (once per environment)" before a build, its duration after, "waiting for another
  process's build (pid N)" when the lock is held: at WARNING, so they show with ``hfquant -q`` and, through
  Python's last-resort handler, in a script that configured no logging.
* **Timing**: ``build_seconds()`` adds up the seconds this process spent building or waiting for a build, so
  callers can keep them out of what they time (``quantization_seconds``, ``timings["quantize"]``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.cpp_extension import LIB_EXT, load

try:
    import fcntl
except ImportError:  # Windows: no flock; torch's own lock file is the only one there
    fcntl = None

logger = logging.getLogger(__name__)

T = TypeVar("T")
MARKER = "hfquant-build.json"  # written after a successful build: what the folder was built for, and how long it took
_THREADS = threading.Lock()  # one build at a time within this process too (flock would make a thread wait on itself)
_SPENT = [0.0]  # seconds spent building or waiting, this process


def cache_root() -> Path:
    """hfquant's cache folder: ``$HFQUANT_CACHE``, else ``$XDG_CACHE_HOME/hfquant``, else ``~/.cache/hfquant``."""
    if os.environ.get("HFQUANT_CACHE"):
        return Path(os.environ["HFQUANT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hfquant"


@functools.lru_cache(maxsize=1)
def cpu_description() -> str:
    """The CPU ``-march=native`` compiles for: model and feature flags of the first processor (Linux), else
    ``platform``'s names."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break  # end of the first processor
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
            fields[name.strip()] = value.strip()
    return json.dumps(fields, sort_keys=True)


def key_fields(name: str, cflags: Sequence[str], source: bytes) -> dict:
    """What the compiled library depends on, besides the name: each one changes the build folder. ``source``: the
    sources' bytes (``sources_text``)."""
    return {
        "name": name,
        "torch": torch.__version__,
        "torch_path": os.path.realpath(os.path.dirname(torch.__file__)),
        "python": sys.implementation.cache_tag,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "python_include": sysconfig.get_path("include", scheme="posix_prefix" if os.name == "posix" else "nt"),
        "compiler": os.environ.get("CXX", "c++"),
        "cflags": list(cflags),
        "cpu": cpu_description() if "-march=native" in cflags else None,
        "source": hashlib.sha256(source).hexdigest(),
    }


def build_folder(name: str, cflags: Sequence[str], source: bytes) -> Path:
    """``<cache>/extensions/<name>-<key>`` (see the module docstring)."""
    fields = json.dumps(key_fields(name, cflags, source), sort_keys=True)
    return cache_root() / "extensions" / f"{name}-{hashlib.sha256(fields.encode()).hexdigest()[:16]}"


def build_seconds() -> float:
    """Seconds this process has spent building hfquant's extensions or waiting for another process's build (a
    load of a finished build adds nothing). Take differences to keep builds out of a timed step."""
    return _SPENT[0]


@contextmanager
def exclusive_lock(lock: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the file ``lock`` (created if needed; the holder's pid is written in it) for the
    block; yields whether it is held (``False`` where there is no ``flock`` or the file system refuses one: the block
    then runs unguarded). When another process holds it, ``on_wait(its pid)`` is called before waiting for it. The
    kernel releases the lock when its owner dies, so it is never stale."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # e.g. a read-only cache folder
            logger.debug("hfquant: no lock file %s (%s); going on without it", lock, exc)
    try:
        yield fd is not None and _lock(fd, lock, on_wait)
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(fd: int, lock: Path, on_wait: Callable[[str], None] | None) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_wait is not None:
            on_wait(os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown")
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # e.g. ENOLCK on a network file system without locks
        logger.debug("hfquant: no lock on %s (%s); going on without it", lock, exc)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return True


def locked_build(folder: Path, build: Callable[[], T], label: str, output: str | None = None,
                 about: dict | None = None) -> T:
    """Run ``build()`` (which compiles into ``folder`` if needed and loads the result) under the folder's lock.
    Announces a build when ``folder`` holds no finished one (no ``MARKER``, or no ``output`` file), times it, and
    writes the marker (its seconds, and ``about``: what it was built for). ``label`` names what is built in the
    messages."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = Path(f"{folder}.lock")
    waiting: list[float] = []  # when another process's build was found holding the lock

    def on_wait(owner: str) -> None:
        logger.warning("hfquant: waiting for another process's build of %s (pid %s; lock %s) ...", label, owner, lock)
        waiting.append(time.perf_counter())

    with _THREADS, exclusive_lock(lock, on_wait) as locked:
        if waiting:
            waited = time.perf_counter() - waiting[0]
            _SPENT[0] += waited
            logger.warning("hfquant: waited %.1f s for another process's build of %s", waited, label)
        if locked:
            # Every live builder holds the lock we now hold, so torch's lock file here is a killed build's.
            (folder / "lock").unlink(missing_ok=True)
        fresh = not (folder / MARKER).is_file() or (output is not None and not (folder / output).is_file())
        if not fresh:
            return build()
        logger.warning("hfquant: building %s (once per environment) in %s ...", label, folder)
        t0 = time.perf_counter()
        try:
            result = build()
        finally:
            seconds = time.perf_counter() - t0
            _SPENT[0] += seconds
        (folder / MARKER).write_text(json.dumps({"seconds": round(seconds, 1), **(about or {})}, indent=1) + "\n")
        logger.warning("hfquant: built %s in %.1f s", label, seconds)
        return result


COMPILED_SUFFIXES = (".cpp", ".cc", ".cxx", ".c")  # compiled; other files (headers) are only copied along


def sources_text(files: dict[str, bytes]) -> bytes:
    """What the build key hashes for the files ``{name: content}``: one file's content as it is; for several, each
    file's name and content in name order (so renaming, adding or changing any file, header included, changes it)."""
    if len(files) == 1:
        return next(iter(files.values()))
    return b"".join(b"%s\0%d\0%s" % (n.encode(), len(t), t) for n, t in sorted(files.items()))


def _place_source(folder: Path, name: str, text: bytes) -> Path:
    """``text`` as ``folder/<name>``, rewritten only when it differs (ninja compares times)."""
    copy = folder / name
    if not copy.is_file() or copy.read_bytes() != text:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f".{copy.name}.{os.getpid()}")
        tmp.write_bytes(text)
        os.replace(tmp, copy)
    return copy


def load_extension(name: str, sources: Path | Sequence[Path], cflags: Sequence[str], label: str):
    """Compile ``sources`` (one file, or several: the ``.cpp`` files are compiled and linked into one module, the
    others, the headers they include, are copied next to them; names must differ) as the torch extension module
    ``name`` with ``cflags`` into its own folder (once per environment, under the lock) and import it; raises what
    torch raises when it cannot be built."""
    paths = [sources] if isinstance(sources, Path) else list(sources)
    files = {p.name: p.read_bytes() for p in paths}
    if len(files) != len(paths):
        raise ValueError(f"{name}: two sources with one file name: {[str(p) for p in paths]}")
    text = sources_text(files)
    folder = build_folder(name, cflags, text)

    def build():
        copies = [_place_source(folder, n, t) for n, t in files.items()]
        compiled = [str(c) for c in copies if c.suffix in COMPILED_SUFFIXES]
        return load(name=name, sources=compiled, extra_cflags=list(cflags), build_directory=str(folder),
                    verbose=False)

    return locked_build(folder, build, label, output=f"{name}{LIB_EXT}", about=key_fields(name, cflags, text))
