"""Nothing left float in silence: which weights a model keeps in float and why, and its real bits per weight.

Every floating weight of 2 or more dims is quantized (held by a quantized module) or in the documented float set:

* ``embedding``: the input embeddings (and any ``nn.Embedding``), looked up rather than multiplied;
* ``head``: the output head, unless ``lm_head_bits`` quantized it;
* ``router``: the routers of MoE blocks (``hfquant.nn.experts.router_names``);
* ``bias``: biases (an MoE's per-expert biases are 2-D);
* ``modules_to_not_convert``: modules the run was told to keep float (the user's list, transformers' defaults for
  quantizers, ``skip`` overrides).

``unexplained_float`` runs on the architecture before any calibration (it also works on a meta-device skeleton):
anything else fails the run with one line naming it. ``coverage`` counts the quantized model: the weights in each
class and the bits per weight over every linear-algebra weight (quantized ones as stored, codes and scales and zero
points; float ones at their dtype; embeddings and biases are not counted).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hfquant.nn.experts import experts_layout, QuantExperts, router_names, RoutedExperts, StackedExperts
from hfquant.nn.graph import is_quantizable, output_head_name
from hfquant.nn.stored import quantized_classes
from hfquant.nn.w8a8 import QuantLinearW8A8

FLOAT_SET = ("embedding", "head", "router", "bias", "modules_to_not_convert")


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (*quantized_classes(), QuantLinearW8A8, StackedExperts))


def _embeddings(model: nn.Module) -> set[int]:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    return {id(m) for m in model.modules() if isinstance(m, nn.Embedding) or m is emb}


def _keep_name(module: nn.Module, name: str, pname: str, p) -> str:
    """The name ``keep`` decides a weight by: the module's, a fused experts tensor's own (``<experts>.<proj>``), or
    for a run's experts modules its first expert's projection (``<experts>.0.<proj>``: all share one decision)."""
    if p.dim() <= 2:
        return name
    return f"{name}.0.{pname}" if isinstance(module, (RoutedExperts, QuantExperts)) else f"{name}.{pname}"


def _float_weights(model: nn.Module, keep: Callable[[str], bool], head_quantized: bool):
    """``(name, parameter, kind)`` for every floating weight of 2+ dims outside quantized modules; ``kind`` is a
    ``FLOAT_SET`` entry, ``"quantizable"`` (a Linear or known experts weight the run quantizes) or ``None``."""
    head, routers, embeddings = output_head_name(model), set(router_names(model)), _embeddings(model)
    for name, module in model.named_modules():
        if _is_quantized(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if not p.is_floating_point() or p.dim() < 2:
                continue
            full = f"{name}.{pname}" if name else pname
            if id(module) in embeddings:
                kind = "embedding"
            elif name == head and name and not head_quantized:
                kind = "head"
            elif name in routers:
                kind = "router"
            elif pname.endswith("bias"):
                kind = "bias"
            elif not keep(_keep_name(module, name, pname, p)):
                kind = "modules_to_not_convert"
            elif is_quantizable(module) or (p.dim() > 2 and experts_layout(module) is not None):
                kind = "quantizable"
            else:
                kind = None
            yield full, p, kind


def unexplained_float(model: nn.Module, keep: Callable[[str], bool], head_quantized: bool = False) -> str | None:
    """The one-line error for the first weight a run would leave float outside the documented set, or ``None``."""
    bad = [(n, p) for n, p, kind in _float_weights(model, keep, head_quantized) if kind is None]
    if not bad:
        return None
    name, p = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return (f"hfquant: {name} {list(p.shape)} is a float weight hfquant would leave unquantized{more}, and it is not "
            "in the documented float set (embeddings, norms, routers, the output head); add its module to "
            "modules_to_not_convert to keep it float knowingly")


def _stored_bits(module: nn.Module) -> tuple[int, int]:
    """``(weights, stored bits)`` of a quantized module (biases not counted)."""
    bits = sum(p.numel() * p.element_size() * 8 for n, p in module.named_parameters(recurse=False) if n != "bias")
    if isinstance(module, StackedExperts):
        t = module._template
        return module.num_experts * t.in_features * t.out_features, bits
    return module.in_features * module.out_features, bits


def coverage(model: nn.Module, keep: Callable[[str], bool], head_quantized: bool = False) -> dict:
    """The quantized model's weights by class (module docstring) and its bits per weight. Raises ``ValueError``
    (one line) if a weight is float outside the documented set."""
    quantized = bits = 0
    for module in model.modules():
        if _is_quantized(module):
            n, b = _stored_bits(module)
            quantized, bits = quantized + n, bits + b
    floats = dict.fromkeys(FLOAT_SET, 0)
    for name, p, kind in _float_weights(model, keep, head_quantized):
        if kind in (None, "quantizable"):
            raise ValueError(f"hfquant: {name} {list(p.shape)} was left float by the run, outside the documented "
                             "float set (embeddings, norms, routers, the output head, modules_to_not_convert)")
        floats[kind] += p.numel()
        if kind not in ("embedding", "bias"):
            bits += p.numel() * p.element_size() * 8
    linear = quantized + sum(v for k, v in floats.items() if k not in ("embedding", "bias"))
    experts = sum(m.num_experts * m._template.in_features * m._template.out_features
                  for m in model.modules() if isinstance(m, StackedExperts))
    return {"bits_per_weight": round(bits / max(linear, 1), 4), "quantized_weights": quantized,
            "expert_weights_quantized": experts, "quantized_experts_modules":
                sum(isinstance(m, QuantExperts) for m in model.modules()),
            "float_weights": floats}
