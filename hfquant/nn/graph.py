"""Finding what to quantize: quantizable Linears, the repeated decoder blocks, module swapping."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hfquant.nn.expert_linear import ExpertLinear


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (weight ``[in, out]``, ``y = x W + b``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_quantizable(module: nn.Module) -> bool:
    """``nn.Linear``, ``Conv1D``, or one expert's projection of a fused MoE module (``ExpertLinear``)."""
    return isinstance(module, (nn.Linear, ExpertLinear)) or is_conv1d(module)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``[out, in]`` orientation (``Conv1D`` weights are transposed)."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def set_float_weight_(module: nn.Module, w: torch.Tensor) -> None:
    """Write ``w`` (``[out, in]``) back into the module's weight, in its own orientation and dtype."""
    target = module.weight
    target.data.copy_((w.t() if is_conv1d(module) else w).to(target.dtype))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = float_weight(module)
    return w.shape[1], w.shape[0]


def quantizable_modules(root: nn.Module, keep: Callable[[str], bool], prefix: str = "") -> dict[str, nn.Module]:
    """Quantizable modules under ``root`` whose full name passes ``keep``, by name relative to ``root``."""
    found = {}
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if name and is_quantizable(module) and keep(full):
            found[name] = module
    return found


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks (decoder or encoder layers): the ``ModuleList`` of same-class children that
    holds the most parameters and at least one quantizable module."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(c) for c in module}) != 1:
            continue
        if not any(is_quantizable(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError("no repeated block of layers with Linear modules was found in this model")
    return best[1], best[2]


def output_head_name(model: nn.Module) -> str | None:
    """The dotted name of the model's output head (``get_output_embeddings()``, e.g. ``lm_head``), or ``None``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head and n), None)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
