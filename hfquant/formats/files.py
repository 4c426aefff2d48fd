"""Checkpoint folders on disk: atomic placement (a run writes beside its output and renames into place), output
folder checks, reading safetensors headers and JSON, and the error for a folder that is not a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open

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


def place(partial: Path, out: Path) -> None:
    """Move the finished ``partial`` folder to ``out``, replacing what is there (checked before the run)."""
    old = out.parent / f".{out.name}.hfquant-old"
    if old.exists():
        shutil.rmtree(old)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        os.rename(out, old)
    os.rename(partial, out)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def tensor_headers(files):
    """``(name, shape, dtype)`` of every tensor in the safetensors ``files``, read from their headers (no
    tensor data); ``dtype`` is safetensors' string (``"F32"``, ``"I32"``, ``"U8"``, ...)."""
    for file in files:
        with safe_open(str(file), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = st.get_slice(key)
                yield key, sl.get_shape(), sl.get_dtype()


def check_checkpoint(folder) -> Path:
    """Raise ``CheckpointError`` unless ``folder`` holds a readable config.json and safetensors files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r}: " + ("is a file, not a checkpoint folder" if folder.exists()
                                                       else "no such folder"))
    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(folder)!r}: no config.json; give a folder written by `hfquant run`") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(config)!r}: unreadable or not JSON ({type(exc).__name__})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(folder)!r}: no *.safetensors files; give a folder written by `hfquant run`")
    for f in files:
        try:
            for _ in tensor_headers([f]):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{str(f)!r}: not a valid safetensors file ({str(exc).splitlines()[0][:120] or type(exc).__name__}); "
                                  "re-run `hfquant run` or re-download it") from None
    return folder


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"{str(path)!r}: unreadable or not JSON") from None
