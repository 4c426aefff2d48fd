"""Where the hidden states between blocks live during block-by-block calibration.

One tensor per calibration batch, written by block ``i`` and read by block ``i + 1``. ``HiddenStore``
keeps them on a device (the execution device, or the host to spare accelerator memory); ``DiskHiddenStore``
writes each one to its own safetensors file and reads it back when needed, so only the batch being
processed is in memory. Both hold two generations: the current inputs and the outputs being written;
``advance`` makes the outputs the next inputs and drops the old ones.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
import torch

ACTIVATIONS = ("device", "cpu", "disk")


class HiddenStore:
    """Hidden states kept in memory on ``store_device`` (``None``: wherever they were computed)."""

    def __init__(self, device, store_device=None):
        self.device, self.store_device = device, store_device
        self._cur: dict[int, torch.Tensor] = {}
        self._next: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._cur)

    def get(self, b: int) -> torch.Tensor:
        return self._cur[b].to(self.device)

    def put(self, b: int, t: torch.Tensor) -> None:
        """Store the next generation's tensor for batch ``b``."""
        self._next[b] = t if self.store_device is None else t.to(self.store_device)

    def advance(self) -> None:
        self._cur, self._next = self._next, {}

    def close(self) -> None:
        self._cur, self._next = {}, {}


class DiskHiddenStore(HiddenStore):
    """Hidden states in safetensors files under a private temporary folder (inside ``folder`` if given)."""

    def __init__(self, device, folder=None):
        super().__init__(device)
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="hfquant-activations-", dir=folder))
        self._gen = 0
        self._n = 0
        self._n_next = 0

    def __len__(self) -> int:
        return self._n

    def _path(self, gen: int, b: int) -> Path:
        return self.root / f"g{gen}-b{b}.safetensors"

    def get(self, b: int) -> torch.Tensor:
        if not 0 <= b < self._n:
            raise IndexError(b)
        return load_file(self._path(self._gen, b), device=str(self.device))["h"]

    def put(self, b: int, t: torch.Tensor) -> None:
        save_file({"h": t.detach().contiguous()}, self._path(self._gen + 1, b))
        self._n_next = max(self._n_next, b + 1)

    def advance(self) -> None:
        for b in range(self._n):
            self._path(self._gen, b).unlink(missing_ok=True)
        self._gen += 1
        self._n, self._n_next = self._n_next, 0

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def make_store(activations: str, device, folder=None) -> HiddenStore:
    """``activations``: ``"device"`` (keep on the execution device), ``"cpu"`` (host memory) or ``"disk"``."""
    if activations == "disk":
        return DiskHiddenStore(device, folder)
    return HiddenStore(device, "cpu" if activations == "cpu" else None)
