"""Checkpoint folders on disk: atomic placement (a run writes beside its output and renames into place), output
folder checks, reading safetensors headers and JSON, and the error for a folder that is not a checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent runs are then not detected
    fcntl = None

from hfquant.core.errors import ConfigError


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class CheckpointError(ConfigError):
    """A folder given to ``eval``/``inspect``/``push`` is not a readable hfquant checkpoint."""


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.hfquant-partial"


def progress_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.hfquant-progress"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Raise ``ConfigError`` unless ``out`` can be created (or replaced, with ``overwrite``). Writes nothing."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"output_dir: {str(out)!r} is a file, not a folder; choose another --output")
        try:
            non_empty = any(out.iterdir())
        except OSError as exc:
            raise ConfigError(f"output_dir: cannot read {str(out)!r} ({exc.strerror}); choose another --output") from None
        if non_empty and not overwrite:
            raise ConfigError(f"output_dir: {str(out)!r} exists and is not empty; pass --overwrite to replace it "
                              "or choose another --output")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output_dir: cannot create {str(out)!r}: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: cannot create {str(out)!r}: {str(parent)!r} is not writable; choose another --output")


def _contains(folder: Path, path: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_output_location(out: Path, inputs: dict[str, Path]) -> None:
    """Raise ``ConfigError`` when replacing ``out`` (``--overwrite`` moves it aside and deletes it) could delete
    something the user has: ``out`` is or contains the current directory or the home directory, or it is, contains or
    lies inside one of the ``inputs`` folders, or it is or contains an input file. ``inputs``: a description
    (``"the input model"``) -> a local path; symbolic links are resolved. Writes nothing."""
    target = Path(out).expanduser().resolve()
    for name, place_ in (("the current directory", Path.cwd()), ("your home directory", Path.home())):
        place_ = place_.resolve()
        if _contains(target, place_):
            relation = "is" if target == place_ else "contains"
            raise ConfigError(f"output_dir: {str(out)!r} {relation} {name} ({str(place_)!r}), which --overwrite would "
                              "delete; choose a new folder for the output, e.g. --output out/<name>")
    for name, path in inputs.items():
        path = Path(path).expanduser().resolve()
        if _contains(target, path):
            relation = "is" if target == path else "contains"
            raise ConfigError(f"output_dir: {str(out)!r} {relation} {name} ({str(path)!r}), which --overwrite would "
                              "delete; choose an output folder outside it")
        if path.is_dir() and _contains(path, target):
            raise ConfigError(f"output_dir: {str(out)!r} is inside {name} ({str(path)!r}); the output must not be written "
                              "into an input folder, choose an output folder outside it")


def place(partial: Path, out: Path) -> None:
    """Move the finished ``partial`` folder to ``out``, replacing what is there (checked before the run): the old
    folder is moved aside to a new name first and deleted only once ``partial`` is in its place."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.hfquant-old-", dir=out.parent))
        old.rmdir()  # a fresh name no one else uses
        os.rename(out, old)
    try:
        os.rename(partial, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # the old output back where it was
        raise
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old)


class OutputLock:
    """``.<name>.hfquant-lock`` beside an output folder: held (``fcntl.flock``, with the owner's pid written in it)
    by the one run that writes the folder, so a second run on the same output is refused at once instead of
    colliding with the first. The operating system releases the lock when its owner exits, however it exits, so a
    lock is never stale; the file itself is removed by its owner."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.hfquant-lock"
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid of the process holding the lock (0 when unknown), or ``None`` when it is free. Writes nothing."""
        if fcntl is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def refuse_if_held(self) -> None:
        pid = self.holder()
        if pid is not None:
            who = f"pid {pid}" if pid else "another process"
            raise ConfigError(f"output_dir: another hfquant run ({who}) is writing {str(self.out)!r} now (lock "
                              f"{str(self.path)!r}); wait for it to finish, or choose another --output")

    def acquire(self) -> None:
        """Take the lock or raise ``ConfigError`` naming the run that holds it."""
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.refuse_if_held()
                continue  # released in between: try again
            try:  # the owner before us may have removed the file after we opened it: lock the file at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the checkpoint files in ``folder``: its ``*.safetensors`` and ``*.gguf`` files."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in Path(folder).glob(pattern))


def gguf_file(path) -> Path | None:
    """The GGUF file a command should read for ``path``: ``path`` itself when it is a ``.gguf`` file, the one
    ``*.gguf`` of a folder without ``config.json`` (an ``hfquant run`` output with ``save_format: gguf``), else
    ``None`` (a safetensors checkpoint, or nothing there). ``CheckpointError`` for a folder with several."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{str(path)!r}: holds {len(found)} .gguf files ({', '.join(f.name for f in found[:3])}); "
                              "pass the path of the one to use")
    return found[0] if found else None


FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLES, SAMPLE_BYTES = 1024, 4096  # larger ones: their safetensors header and this many evenly spaced samples


def file_digest(path: Path) -> str:
    """A content digest of a weight file, cheap for any size: ``"<size>:<sha256>"`` of the whole file up to
    ``FULL_HASH_BYTES``, else of its first 1 MiB (a safetensors header: every tensor's name, dtype, shape and offsets)
    and ``SAMPLES`` blocks of ``SAMPLE_BYTES`` spread evenly over the rest (4 MiB read per file)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 20))
            step = (size - (1 << 20)) // SAMPLES
            for i in range(SAMPLES):
                f.seek((1 << 20) + i * step)
                h.update(f.read(SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()[:32]}"


def weights_fingerprint(folder: Path) -> dict[str, str]:
    """File name -> ``file_digest`` of a local model folder's ``config.json``, safetensors index and weight files:
    what a resumed run checks its saved progress against (the weights, not the folder's path)."""
    folder = Path(folder)
    names = {"config.json", "model.safetensors.index.json"} | {f.name for f in folder.glob("*.safetensors")}
    return {name: file_digest(folder / name) for name in sorted(names) if (folder / name).is_file()}


def describe_fingerprint_change(old: dict, new: dict) -> str:
    """What differs between two ``weights_fingerprint`` results, in words (the first few files)."""
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None or b is None:
            changes.append(f"{name} {'added' if a is None else 'removed'}")
        elif a.split(":")[0] != b.split(":")[0]:
            changes.append(f"{name} size {a.split(':')[0]} -> {b.split(':')[0]} bytes")
        else:
            changes.append(f"{name} content differs")
    return ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")


def tensor_headers(files):
    """``(name, shape, dtype)`` of every tensor in the safetensors ``files``, read from their headers (no
    tensor data); ``dtype`` is safetensors' string (``"F32"``, ``"I32"``, ``"U8"``, ...)."""
    for file in files:
        with safe_open(str(file), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = st.get_slice(key)
                yield key, sl.get_shape(), sl.get_dtype()


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"{str(path)!r}: unreadable or not JSON") from None
