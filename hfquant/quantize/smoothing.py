"""Graph side of SmoothQuant: which norm feeds which Linears, folding ``s``, and checking exactness.

Candidates are found generically: a module whose class name contains ``Norm`` and whose output tensor is
the very tensor a group of Linears reads (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``, OPT's ``self_attn_layer_norm``/``final_layer_norm`` ...). Whether folding is
exact (the norm's output feeds *only* those Linears, and the norm is ``weight * normalized (+ bias)``) is
then checked on real data: the block's output must not change when ``s`` is folded in. Post-norm blocks
(BERT), where the norm output also feeds the residual branch, fail that check and are reported unsmoothed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfquant.nn.graph import is_conv1d


# Norm -> Linears pairs the SmoothQuant reference (smooth.py) and llm-compressor use, per model family.
# Discovery is generic; this table only cross-checks it, so a family whose graph hides a known pair is reported.
KNOWN_GROUPS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "llama": [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))],
    "opt": [("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",))],
}
for _alias in ("mistral", "qwen2", "qwen3"):
    KNOWN_GROUPS[_alias] = KNOWN_GROUPS["llama"]


def missing_known_groups(model_type: str | None, found: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """Known pairs of ``model_type`` that discovery did not smooth, as readable strings."""
    found_set = {(n, tuple(sorted(ls))) for n, ls in found}
    return [f"{n} -> {', '.join(ls)}" for n, ls in KNOWN_GROUPS.get(model_type or "", [])
            if (n, tuple(sorted(ls))) not in found_set]


def is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(w, torch.Tensor) and w.dim() == 1


@dataclass
class SmoothGroup:
    """Linears reading one tensor, and the norm that produced it (if any)."""

    names: list[str]
    modules: list[nn.Module]
    norm_name: str | None = None
    norm: nn.Module | None = None


def find_producers(block: nn.Module, groups, call) -> list[SmoothGroup]:
    """Attach to each group the norm whose output it reads, by running ``call()`` once with hooks."""
    out_ids: dict[int, str] = {}
    in_ids: dict[int, int] = {}
    keep = []
    handles = []
    norms = {n: m for n, m in block.named_modules() if n and is_norm(m)}
    for name, m in norms.items():
        def fwd(_m, _a, out, _n=name):
            keep.append(out)
            out_ids[id(out)] = _n
        handles.append(m.register_forward_hook(fwd))
    for k, g in enumerate(groups):
        def pre(_m, args, _k=k):
            keep.append(args[0])
            in_ids.setdefault(_k, id(args[0]))
        handles.append(g.modules[0].register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    result = []
    for k, g in enumerate(groups):
        norm_name = out_ids.get(in_ids.get(k, -1))
        result.append(SmoothGroup(g.names, g.modules, norm_name, norms.get(norm_name)))
    return result


@torch.no_grad()
def fold_(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """``norm.weight /= s`` (and its bias), each Linear's input columns ``*= s``."""
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        if is_conv1d(lin):
            lin.weight.mul_(s.to(lin.weight.dtype)[:, None])
        else:
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))
