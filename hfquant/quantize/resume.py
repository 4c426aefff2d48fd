"""Per-block progress of a quantization run, saved atomically so a killed run can resume.

A progress folder holds ``state.json`` (the run key and how many blocks are finished), one
``block-<i>.safetensors`` + ``block-<i>.json`` per finished block (that block's quantization results: per
module, its tensors named ``<module>:<field>`` and its report under the module's name in the JSON),
and ``hidden-<k>.safetensors`` (the calibration hidden states entering block ``k``). Every file is written
to a temporary name and renamed into place; ``state.json`` is written last, so it is the commit point:
whatever a SIGKILL leaves behind, ``state.json`` names only complete files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from safetensors.torch import load_file, save_file
import torch

from hfquant.core.errors import ConfigError

STATE = "state.json"


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # Own host copies: views of one tensor (a fused solve's codes, a shared g_idx) cannot be saved as they
    # are, and copying to the host directly costs no device memory (hidden states can be GiBs on a GPU).
    save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}, str(tmp))
    _replace(tmp, path)


class ResumeStore:
    """Progress of one run in ``folder``. ``key`` identifies the run; ``parts`` (optional) are what it is made of,
    by name (``"model weights"``: a ``weights_fingerprint``, ``"recipe"``, ``"calibration data"``), saved so that a
    refused ``--resume`` can say which of them changed. ``describe(name, old, new)`` (optional) words a change."""

    def __init__(self, folder: Path, key: str, parts: dict | None = None, describe=None):
        self.folder = Path(folder)
        self.key = key
        self.parts = parts or {}
        self.describe = describe
        self.state: dict = {"key": key, "parts": self.parts, "blocks_done": 0, "hidden": None, "extra": {}}
        self.resumed_from = 0

    def _changed(self, saved: dict) -> str:
        """Which part of the run differs from the saved progress's, in words."""
        old = saved.get("parts") or {}
        for name, value in self.parts.items():
            if name in old and old[name] != value:
                detail = self.describe(name, old[name], value) if self.describe else ""
                return f"the {name} changed" + (f" ({detail})" if detail else "")
        return "the recipe, model or calibration data changed"

    def exists(self) -> bool:
        return (self.folder / STATE).is_file()

    def start(self, resume: bool) -> None:
        """Resume the saved progress (it must belong to this run) or start empty."""
        if resume and self.exists():
            try:
                state = json.loads((self.folder / STATE).read_text())
            except (OSError, ValueError):
                raise ConfigError(f"--resume: progress in {self.folder} is unreadable; rerun with --overwrite to start over") from None
            if not isinstance(state, dict) or state.get("key") != self.key:
                changed = self._changed(state if isinstance(state, dict) else {})
                raise ConfigError(f"--resume: {changed} since the unfinished run in {str(self.folder)!r} was saved; "
                                  "resume with the same inputs, or pass --overwrite to start over")
            self.state = state
            self.resumed_from = self.blocks_done
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in self.folder.iterdir():
            if f.is_file():
                f.unlink()
        self._commit()

    def _commit(self) -> None:
        atomic_write_text(self.folder / STATE, json.dumps(self.state, indent=1))

    @property
    def blocks_done(self) -> int:
        return int(self.state["blocks_done"])

    def get(self, name: str):
        return self.state["extra"].get(name)

    def put(self, name: str, value) -> None:
        self.state["extra"][name] = value
        self._commit()

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], meta: dict, hidden: list[torch.Tensor]) -> None:
        """Record block ``i`` as finished, with its results and the hidden states entering block ``i + 1``."""
        if i != self.blocks_done:
            raise RuntimeError(f"progress: block {i} saved after {self.blocks_done} finished blocks")
        atomic_save_tensors(self.folder / f"block-{i}.safetensors", tensors)
        atomic_write_text(self.folder / f"block-{i}.json", json.dumps(meta))
        hidden_name = f"hidden-{i + 1}.safetensors"
        atomic_save_tensors(self.folder / hidden_name, {str(b): h for b, h in enumerate(hidden)})
        old = self.state["hidden"]
        self.state.update(blocks_done=i + 1, hidden=hidden_name)
        self._commit()
        if old and old != hidden_name:
            (self.folder / old).unlink(missing_ok=True)
        hook = os.environ.get("HFQUANT_TEST_PAUSE_AFTER_BLOCK")
        if hook is not None and int(hook) == i:  # tests: wait here to be killed with SIGKILL
            time.sleep(120)

    def load_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        return (load_file(str(self.folder / f"block-{i}.safetensors")),
                json.loads((self.folder / f"block-{i}.json").read_text()))

    def save_modules(self, i: int, modules: dict[str, dict[str, torch.Tensor]], meta: dict[str, dict],
                     hidden: list[torch.Tensor]) -> None:
        """``save_block`` with per-module results: each module's stored tensors (field -> tensor, the fields of its
        weight format) are saved as ``<module>:<field>``; ``meta`` holds each module's JSON-able record under its
        name, in the order the modules are to be restored."""
        tensors = {f"{name}:{f}": t for name, ts in modules.items() for f, t in ts.items()}
        self.save_block(i, tensors, meta, hidden)

    def load_modules(self, i: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
        """Block ``i`` as saved by ``save_modules``: module -> its tensors by field, and module -> its record, both in
        the saved order."""
        tensors, meta = self.load_block(i)
        fields: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta}
        for key, t in tensors.items():
            name, field = key.rsplit(":", 1)
            fields[name][field] = t
        return fields, meta

    def load_hidden(self) -> list[torch.Tensor]:
        saved = load_file(str(self.folder / self.state["hidden"]))
        return [saved[str(b)] for b in range(len(saved))]
