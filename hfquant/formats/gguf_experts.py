"""Mixture-of-experts tensors in a GGUF file (``hfquant.formats.gguf``).

llama.cpp stores a layer's experts as three 3-D tensors, ``ffn_gate_exps`` and ``ffn_up_exps`` ``[E, I, H]`` and
``ffn_down_exps`` ``[E, H, I]`` (GGUF lists the dims reversed), whose data is the experts' 2-D weights one after the
other. A saved folder holds them in one of three layouts, all read here:

* per expert, as transformers 5.x's ``save_pretrained`` writes them (the Hub layout): ``<block>.experts.<e>.
  gate_proj / up_proj / down_proj.weight`` (Qwen MoE), ``<block>.experts.<e>.w1 / w3 / w2.weight`` (Mixtral);
  quantized, the same modules' ``qweight``;
* fused, as transformers 5.x holds them in memory: ``<block>.experts.gate_up_proj`` ``[E, 2I, H]`` (each expert's
  gate rows, then its up rows) and ``<block>.experts.down_proj`` ``[E, H, I]``;
* a quantized experts module (``hfquant.nn.experts.QuantExperts``): per projection, its per-expert tensors stacked
  on a leading expert axis, ``<block>.experts.gate_up_proj.qweight`` ``[E, 2I, row bytes]`` for GGUF blocks.

Quantized experts become llama.cpp's 3-D tensor by ``stack_expert_blocks`` (the experts' block rows concatenated
along the expert axis); a fused ``gate_up_proj`` is split into its gate and up rows, float or blocks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import re

import torch

from hfquant.core.errors import FormatError
from hfquant.formats.gguf_layout import model_arch

# <...>.layers.<N>.<block>.experts.<e>.<projection>.<tensor>
_EXPERTS = r"^(?P<experts>.*\.layers\.(?P<layer>\d+)\.[^.]+\.experts)"
_PER_EXPERT = re.compile(_EXPERTS + r"\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<leaf>\w+)$")
# <...>.layers.<N>.<block>.experts.<projection>[.<tensor of its quantized format>]
_FUSED = re.compile(_EXPERTS + r"\.(?P<proj>gate_up_proj|down_proj)(?:\.(?P<leaf>\w+))?$")
# HF projection -> the gguf package's MODEL_TENSOR names of what it becomes (gate_up_proj: its two row halves)
_TARGETS = {"gate_proj": ("FFN_GATE_EXP",), "w1": ("FFN_GATE_EXP",), "up_proj": ("FFN_UP_EXP",), "w3": ("FFN_UP_EXP",),
            "down_proj": ("FFN_DOWN_EXP",), "w2": ("FFN_DOWN_EXP",), "gate_up_proj": ("FFN_GATE_EXP", "FFN_UP_EXP")}


@dataclass
class ExpertTensor:
    """One GGUF expert tensor to write: the folder's ``keys`` it is read from (one per expert, or one with the
    experts ``stacked`` on its first axis), the tensor name ``leaf`` they hold (``None``: a fused float weight), and
    ``part`` (0 / 1: the gate / up rows of a fused ``gate_up_proj``; ``None``: all rows)."""

    name: str
    experts: str
    proj: str
    leaf: str | None
    part: int | None
    keys: list[str] = field(default_factory=list)
    stacked: bool = False


def expert_tensors(gguf, arch: str, keys: Sequence[str]) -> dict[str, ExpertTensor]:
    """The GGUF expert tensors the folder's ``keys`` make, by GGUF name (none for a dense model)."""
    found: dict[str, ExpertTensor] = {}
    per_expert: dict[str, dict[int, str]] = {}
    for key in keys:
        m = _PER_EXPERT.match(key) or _FUSED.match(key)
        if m is None or m["proj"] not in _TARGETS:
            continue
        if m["leaf"] not in (None, "weight", "qweight"):
            raise FormatError(f"{key}: llama.cpp's expert tensors hold the experts' weights only, not their "
                              f"{m['leaf']}; the exporter cannot place it")
        for part, kind in enumerate(_TARGETS[m["proj"]]):
            name = _gguf_name(gguf, arch, kind, int(m["layer"]))
            t = found.setdefault(name, ExpertTensor(name, m["experts"], m["proj"], m["leaf"],
                                                    part if m["proj"] == "gate_up_proj" else None))
            if t.leaf != m["leaf"]:
                raise FormatError(f"{t.experts}.{t.proj}: some experts are stored as {t.leaf}, others as {m['leaf']}; "
                                  "a GGUF experts tensor has one type; quantize all experts of a projection or none")
            if "e" in m.groupdict():
                per_expert.setdefault(name, {})[int(m["e"])] = key
            else:
                t.keys, t.stacked = [key], True
    for name, by_index in per_expert.items():
        if sorted(by_index) != list(range(len(by_index))) or found[name].keys:
            raise FormatError(f"{found[name].experts}: experts {sorted(by_index)} of {found[name].proj}; expected "
                              "experts 0 to E-1 in one layout; re-save the model")
        found[name].keys = [by_index[e] for e in range(len(by_index))]
    return found


def _gguf_name(gguf, arch: str, kind: str, layer: int) -> str:
    member = getattr(gguf.MODEL_TENSOR, kind)
    if member not in gguf.MODEL_TENSORS[model_arch(gguf, arch)]:
        raise FormatError(f"GGUF architecture {arch!r} has no expert tensors; a model with experts cannot be "
                          "written as it")
    return gguf.TENSOR_NAMES[member].format(bid=layer) + ".weight"


def take_part(t: ExpertTensor, stacked: torch.Tensor) -> torch.Tensor:
    """The rows of ``stacked`` (``[E, rows, ...]``: float weights or block rows) that ``t`` holds: a fused
    ``gate_up_proj``'s gate half (part 0) or up half (part 1), else all of it."""
    if t.part is None:
        return stacked.contiguous()
    rows = stacked.shape[1]
    if stacked.dim() != 3 or rows % 2:
        raise FormatError(f"{t.experts}.gate_up_proj: shape {list(stacked.shape)}, expected [experts, "
                          "2 * intermediate, columns]; re-save the model with transformers 5.x")
    half = rows // 2
    return stacked[:, t.part * half:(t.part + 1) * half].contiguous()


def stack_expert_blocks(blocks: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """One projection's quantized experts as llama.cpp's 3-D tensor data: each expert's GGUF block rows (uint8
    ``[rows, row bytes]``, as a GGUF file stores a 2-D weight) concatenated along a new leading expert axis, ``[E,
    rows, row bytes]``. ``blocks``: the per-expert tensors, or a tensor already stacked that way (a saved
    ``QuantExperts``' ``qweight``)."""
    parts = list(blocks.unbind(0)) if isinstance(blocks, torch.Tensor) else list(blocks)
    if not parts or any(p.dtype != torch.uint8 or p.dim() != 2 or p.shape != parts[0].shape for p in parts):
        shapes = sorted({(str(p.dtype), tuple(p.shape)) for p in parts})
        raise FormatError(f"expert blocks: got {shapes or 'none'}; expected one uint8 [rows, row bytes] tensor per "
                          "expert, all of one shape (quantize every expert of a projection with one GGUF type)")
    return torch.stack([p.contiguous() for p in parts]).contiguous()


def expert_type(schemes: dict, t: ExpertTensor, num_experts: int) -> str:
    """The GGUF type of quantized experts from the checkpoint's ``module_schemes``: the entry of the stacked module
    ``<experts>.<proj>`` or, all alike, those of the experts' own modules ``<experts>.<e>.<proj>``. ``FormatError``
    when none is stated or the experts differ (llama.cpp's tensor has one type)."""
    own = (schemes.get(f"{t.experts}.{t.proj}") or {}).get("gguf_type")
    if own is not None:
        return own
    kinds = {(schemes.get(f"{t.experts}.{e}.{t.proj}") or {}).get("gguf_type") for e in range(num_experts)}
    if len(kinds) > 1 or None in kinds:
        raise FormatError(f"{t.experts}.{t.proj}: its experts' GGUF types in module_schemes are "
                          f"{sorted(map(str, kinds))}; a GGUF experts tensor has one type; quantize the experts of a "
                          "projection with one type and re-save")
    return kinds.pop()
