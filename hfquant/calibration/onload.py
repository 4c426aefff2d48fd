"""Layer-wise onloading: quantize a model without ever holding all of its float weights in memory.

The model skeleton is built on the meta device (accelerate's ``init_empty_weights``; buffers such as
rotary frequencies stay real). ``LayerLoader`` reads tensors straight from the checkpoint's safetensors
shards when they are needed:

1. the modules outside the repeated blocks (embeddings, ...) for the calibration capture, then freed;
2. each decoder block when its turn comes; once quantized, the block keeps only its quantized form;
3. the modules outside the blocks again at the end, to be saved with the quantized blocks.

The result is the same model, module for module and bit for bit, as ``from_pretrained`` followed by
``quantize_`` (tensors are cast to the load dtype exactly like ``from_pretrained`` does).
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
import time
from pathlib import Path

from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from huggingface_hub import snapshot_download
from safetensors import safe_open
import torch
from transformers import AutoConfig, AutoModelForCausalLM

try:  # transformers >= 5: the conversions it loads checkpoints with (an MoE's per-expert tensors merged)
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:  # pragma: no cover - older transformers: every tensor is stored under its own name
    revert_weight_conversion = None

from hfquant.nn.graph import find_blocks
from hfquant.core.errors import ConfigError

logger = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a local model folder (sharded with an index, or one file)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"hfquant: {str(folder / INDEX)!r} is not a readable safetensors index "
                              "(expected a JSON object with a 'weight_map')") from None
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), "pt") as f:
            return {name: folder / SINGLE for name in f.keys()}
    raise ConfigError(f"hfquant: layer-wise loading needs {SINGLE} or {INDEX} in {str(folder)!r}; "
                      "convert the checkpoint to safetensors or load it whole (layerwise: false)")


class LayerLoader:
    """Loads a meta-device model's tensors from safetensors shards, a module prefix at a time.

    Args:
        model: the skeleton (parameters on ``meta``).
        folder: local model folder with the safetensors shards.
        device: execution device the tensors go to.
        dtype: floating-point tensors are cast to it (what ``from_pretrained(dtype=...)`` does).
    """

    def __init__(self, model, folder, device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.files = checkpoint_files(folder)
        self.blocks_name, self.blocks = find_blocks(model)
        self.tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source
        self.seconds = 0.0  # time spent reading tensors

    def _names(self, inside: str | None) -> list[str]:
        """State-dict names under block ``inside`` (a prefix), or outside every block when ``None``."""
        prefix = self.blocks_name + "."
        names = []
        for name in self.model.state_dict(keep_vars=True):
            if inside is None and not name.startswith(prefix):
                names.append(name)
            elif inside is not None and name.startswith(inside + "."):
                names.append(name)
        return names

    def _load(self, names: list[str]) -> None:
        t0 = time.perf_counter()
        state = self.model.state_dict(keep_vars=True)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if not state[name].is_meta:
                continue
            if name not in self.files:
                if name in self.tied:
                    continue  # tied to its source; tie_weights() links it
                self._load_converted(name, state[name])
                continue
            by_file.setdefault(self.files[name], []).append(name)
        for file, file_names in by_file.items():
            with safe_open(str(file), "pt") as f:
                for name in file_names:
                    # A private copy: the tensor safetensors returns lives in the file's memory map, and
                    # any tensor still using it (a norm weight kept after its block) would keep the whole
                    # mapping, and every page of it the block touched, resident until the end of the run.
                    t = f.get_tensor(name)
                    t = t.to(self.dtype, copy=True) if t.is_floating_point() else t.clone()
                    set_module_tensor_to_device(self.model, name, self.device, value=t)
        if self.tied:
            self.model.tie_weights()
        self.seconds += time.perf_counter() - t0

    def _load_converted(self, name: str, meta: torch.Tensor) -> None:
        """A tensor the checkpoint stores under other names, as transformers converts them when loading (an MoE's
        per-expert ``experts.<e>.w1/w3.weight`` merged into ``experts.gate_up_proj``; renamed modules): transformers'
        own reverse conversion, run on a tensor of element indices, says which stored tensor fills which elements."""
        probe = {name: torch.arange(meta.numel(), dtype=torch.int64, device="cpu").reshape(meta.shape)}
        sources = revert_weight_conversion(self.model, probe) if revert_weight_conversion is not None else {}
        if not sources or any(key not in self.files for key in sources):
            raise ConfigError(f"hfquant: tensor {name!r} is not in the checkpoint's safetensors files; this "
                              "model's checkpoint layout is not supported layer-wise (use layerwise: false)")
        flat, filled = None, 0
        for key, index in sources.items():
            with safe_open(str(self.files[key]), "pt") as f:
                t = f.get_tensor(key)
            if flat is None:
                flat = torch.empty(meta.numel(), dtype=self.dtype if t.is_floating_point() else t.dtype, device="cpu")
            flat[index.reshape(-1)] = t.reshape(-1).to(flat.dtype)
            filled += index.numel()
        if filled != meta.numel():
            raise ConfigError(f"hfquant: tensor {name!r} is only partly in the checkpoint's safetensors files "
                              f"({filled} of {meta.numel()} values); load it whole (layerwise: false)")
        set_module_tensor_to_device(self.model, name, self.device, value=flat.reshape(meta.shape))

    def _unload(self, names: list[str]) -> None:
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        for name in names:
            if name in params:
                set_module_tensor_to_device(self.model, name, "meta")
        for target in self.tied:  # a tied copy would keep the freed tensor alive
            if target in params and target in names:
                set_module_tensor_to_device(self.model, target, "meta")

    def _outside(self) -> list[str]:
        names = self._names(None)
        tied_targets = [t for t in self.tied if t not in names and not t.startswith(self.blocks_name + ".")]
        return names + tied_targets

    def load_outside(self) -> None:
        """Load every tensor outside the repeated blocks (embeddings, final norm, untied head)."""
        self._load(self._outside())

    def capture_done(self) -> None:
        """The block inputs are recorded: free the tensors outside the blocks until the end."""
        self._unload(self._outside())
        release_freed_memory()

    def load_block(self, index: int) -> None:
        self._load(self._names(f"{self.blocks_name}.{index}"))

    def block_done(self, index: int) -> None:
        """The quantized modules replaced the float ones (norms and float-kept Linears stay): hand the memory
        the block's float weights and activations used back to the system."""
        release_freed_memory()

    def load_rest(self) -> None:
        """Load whatever is still on meta (the modules outside the blocks, any block never run)."""
        self._load([n for n, t in self.model.state_dict(keep_vars=True).items() if t.is_meta])


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc only; elsewhere a no-op).

    glibc keeps memory freed by a block's large temporaries (attention scores, MLP activations) in its
    arenas, so without this the resident size grows block after block even though nothing is live.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc: nothing to trim
        pass


def empty_model(folder, dtype: torch.dtype, *, revision=None, trust_remote_code: bool = False):
    """The ``AutoModelForCausalLM`` of ``folder`` with its parameters on the meta device (buffers real)."""
    config = AutoConfig.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.name_or_path = str(folder)
    model.config._name_or_path = str(folder)
    return model.eval()


def local_folder(model: str, revision=None) -> Path:
    """``model`` as a local folder: itself, or its Hub snapshot (safetensors and config only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path

    return Path(snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
