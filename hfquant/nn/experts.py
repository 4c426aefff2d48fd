"""Mixture-of-Experts blocks whose experts are fused 3-D parameters (transformers 5.x ``*Experts`` modules).

Found by what they hold, not by class name: a module with floating parameters of 3 or more dims whose first axis
(the expert axis) has one length is an experts module. hfquant knows how it computes when it carries the layout
that transformers' ``use_experts_implementation`` declares on every such class (``has_gate``, ``is_transposed``,
``has_bias``, ``has_post_expert_norm``) and its fused parameters are the ones that layout names (``gate_up_proj``
or ``up_proj``, then ``down_proj``, with ``<proj>_bias``): it is called as ``experts(hidden_states, top_k_index,
top_k_weights)`` with the router's choices and computes, for each token and each expert chosen for it,
``weight * down(gate(gate_up(x)))`` (the gate: the class's own ``_apply_gate``, e.g. gpt-oss's interleaved and
clamped SwiGLU, or its activation alone without a gate), summed over the chosen experts.

* ``RoutedExperts`` runs that computation through one ``ExpertLinear`` per expert and projection (named
  ``<experts>.<e>.<proj>``), each called with exactly its routed tokens: the form a run calibrates and quantizes
  (the fused parameters stay where they were, under the same names, until the experts are quantized).
* ``QuantExperts`` is the quantized form: per projection, the experts' quantized tensors stacked on a leading
  expert axis (``StackedExperts``; ``<experts>.<proj>.<tensor>``), and each active expert computed by the quantized
  module of its format on views of those tensors (decode: one GEMV per active expert and projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfquant.nn.expert_linear import ExpertLinear

_LAYOUT_FLAGS = ("has_gate", "is_transposed", "has_bias")


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module computes: its projections in call order, their orientation and biases."""

    num_experts: int
    projections: tuple[str, ...]
    transposed: bool
    has_bias: bool
    has_gate: bool
    post_norm: bool

    def bias_name(self, proj: str) -> str | None:
        return f"{proj}_bias" if self.has_bias else None

    def tensor_names(self) -> tuple[str, ...]:
        """The fused parameters, biases included."""
        return self.projections + tuple(self.bias_name(p) for p in self.projections if self.has_bias)

    def dims(self, module: nn.Module, proj: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of one expert's ``proj``."""
        shape = getattr(module, proj).shape[1:]
        return (shape[0], shape[1]) if self.transposed else (shape[1], shape[0])


def fused_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own floating parameters with 3 or more dims (a quantized ``StackedExperts`` has none: its 3-D
    float tensors are scales)."""
    if isinstance(module, StackedExperts):
        return {}
    return {n: p for n, p in module.named_parameters(recurse=False) if p.is_floating_point() and p.dim() >= 3}


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers experts module, or ``None`` when the module does not declare one hfquant can run
    (see the module docstring)."""
    if isinstance(module, (RoutedExperts, QuantExperts)):
        return module.layout
    fused = fused_weights(module)
    if not fused or not all(hasattr(module, f) for f in _LAYOUT_FLAGS):
        return None
    first = "gate_up_proj" if module.has_gate else "up_proj"
    projections = (first, "down_proj")
    layout = ExpertsLayout(next(iter(fused.values())).shape[0], projections, bool(module.is_transposed),
                           bool(module.has_bias), bool(module.has_gate),
                           bool(getattr(module, "has_post_expert_norm", False)))
    if set(fused) != set(projections) or any(p.dim() != 3 or p.shape[0] != layout.num_experts for p in fused.values()):
        return None
    if layout.has_bias and any(getattr(module, layout.bias_name(p), None) is None for p in projections):
        return None
    if layout.post_norm and not isinstance(getattr(module, "post_expert_norm", None), nn.Module):
        return None
    return layout


def unknown_layout_error(name: str, module: nn.Module) -> str:
    """The one line for a module with fused 3-D weights hfquant cannot run."""
    shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in fused_weights(module).items())
    return (f"hfquant: {name} ({type(module).__name__}) holds fused expert weights ({shapes}) in a layout hfquant does "
            "not know (expected transformers' experts layout: gate_up_proj or up_proj, then down_proj, "
            "[experts, out, in] or transposed); add it to modules_to_not_convert to keep it float knowingly")


class _Routed(nn.Module):
    """The routed computation shared by ``RoutedExperts`` and ``QuantExperts``; subclasses give ``projection(e, p)``
    (expert ``e``'s module for projection ``p``)."""

    layout: ExpertsLayout

    def _init_from(self, source: nn.Module, layout: ExpertsLayout) -> None:
        object.__setattr__(self, "_source", source)  # its gate function, activation and constants; not a child
        self.layout = layout
        if layout.post_norm:
            self.post_expert_norm = source.post_expert_norm

    def projection(self, e: int, proj: str) -> nn.Module:
        raise NotImplementedError

    def _expert(self, e: int, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        first, down = self.layout.projections
        mods = (self.projection(e, first), self.projection(e, down))
        for m in mods:
            if isinstance(m, ExpertLinear):
                m.row_weights = w
        h = mods[0](x)
        h = self._source._apply_gate(h) if self.layout.has_gate else self._source.act_fn(h)
        y = mods[1](h)
        return self.post_expert_norm(y) if self.layout.post_norm else y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """``hidden_states`` ``[tokens, hidden]``; the router's ``top_k_index`` and ``top_k_weights``
        ``[tokens, k]``."""
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.layout.num_experts).tolist()
        out = torch.zeros_like(hidden_states)
        all_tokens = getattr(self, "all_tokens", False)
        start = 0
        for e in range(self.layout.num_experts):
            n = counts[e]
            if n == 0 and not all_tokens:
                continue
            sel = order[start:start + n]
            start += n
            tok, w = sel // k, top_k_weights.reshape(-1)[sel]
            if all_tokens:  # every token through the expert (its statistics), only the routed ones kept
                y = self._expert(e, hidden_states, None)[tok]
            else:
                y = self._expert(e, hidden_states[tok], w)
            out.index_add_(0, tok, (y * w[:, None].to(y.dtype)).to(out.dtype))
        return out


class RoutedExperts(_Routed):
    """An experts module run as one ``ExpertLinear`` per expert and projection (module docstring). It holds the
    source module's fused parameters under their own names; ``all_tokens`` (set by a calibration run) sends every
    token through every expert for its statistics while the output keeps only the routed ones."""

    def __init__(self, source: nn.Module, layout: ExpertsLayout):
        super().__init__()
        self._init_from(source, layout)
        for name in layout.tensor_names():
            setattr(self, name, getattr(source, name))
        self.all_tokens = False
        for e in range(layout.num_experts):
            self.add_module(str(e), nn.ModuleDict({p: ExpertLinear(self, p, e, layout.transposed, layout.bias_name(p))
                                                   for p in layout.projections}))

    def projection(self, e: int, proj: str) -> nn.Module:
        return self._modules[str(e)][proj]

    def expert_modules(self, proj: str) -> list[nn.Module]:
        return [self.projection(e, proj) for e in range(self.layout.num_experts)]


class StackedExperts(nn.Module):
    """One projection of every expert: the tensors of a per-expert quantized module (``template``'s parameters),
    stacked on a leading expert axis and saved under the template's names. ``expert(e)`` is a module of the
    template's class whose parameters are views of expert ``e``'s slices (built once per storage)."""

    def __init__(self, template: nn.Module, num_experts: int, tensors: dict[str, torch.Tensor] | None = None):
        super().__init__()
        object.__setattr__(self, "_template", template)
        self.num_experts = num_experts
        for name, p in template.named_parameters(recurse=False):
            t = tensors[name] if tensors is not None else torch.zeros((num_experts, *p.shape), dtype=p.dtype,
                                                                      device="meta")
            setattr(self, name, nn.Parameter(t, requires_grad=False))
        self._views: tuple = (None, [])

    @classmethod
    def from_modules(cls, modules: list[nn.Module]) -> StackedExperts:
        """Stack the tensors of per-expert modules of one class and shape (the first is the template)."""
        names = [n for n, _ in modules[0].named_parameters(recurse=False)]
        tensors = {n: torch.stack([getattr(m, n).detach() for m in modules]) for n in names}
        return cls(modules[0], len(modules), tensors)

    def _key(self) -> tuple:
        return tuple((p.data_ptr(), p.dtype, p.device) for p in self.parameters(recurse=False))

    def expert(self, e: int) -> nn.Module:
        key, views = self._views
        now = self._key()
        if key != now:
            views = [self._view(i) for i in range(self.num_experts)]
            self._views = (now, views)
        return views[e]

    def _view(self, e: int) -> nn.Module:
        t = self._template
        m = t.__class__.__new__(t.__class__)
        m.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in t.__dict__.items()})
        for name, p in self.named_parameters(recurse=False):
            m._parameters[name] = nn.Parameter(p[e], requires_grad=False)
        if isinstance(m.__dict__.get("_kernel_cache"), dict):
            m._kernel_cache = {}
        return m

    def extra_repr(self) -> str:
        return f"{self.num_experts} x {self._template.extra_repr()}"


class QuantExperts(_Routed):
    """The quantized form of an experts module (module docstring): ``stacks`` maps each projection to its
    ``StackedExperts``, or to the fused float parameter of a projection left float (e.g. rows no GGUF block type
    fits; with its biases in ``biases``); ``source`` is the original module (gate function, activation,
    constants)."""

    def __init__(self, source: nn.Module, layout: ExpertsLayout, stacks: dict[str, nn.Module | nn.Parameter],
                 biases: dict[str, nn.Parameter] | None = None):
        super().__init__()
        self._init_from(source, layout)
        views = {}
        for proj in layout.projections:
            setattr(self, proj, stacks[proj])
            if isinstance(stacks[proj], nn.Parameter):
                if layout.has_bias:
                    setattr(self, layout.bias_name(proj), biases[proj])
                views[proj] = [ExpertLinear(self, proj, e, layout.transposed, layout.bias_name(proj))
                               for e in range(layout.num_experts)]
        object.__setattr__(self, "_float_views", views)  # not children: they hold no tensor of their own

    def projection(self, e: int, proj: str) -> nn.Module:
        stack = self._modules.get(proj)
        return stack.expert(e) if stack is not None else self._float_views[proj][e]

    def expert_modules(self, proj: str) -> list[nn.Module]:
        return [self.projection(e, proj) for e in range(self.layout.num_experts)]


def find_experts(root: nn.Module) -> dict[str, nn.Module]:
    """Every module under ``root`` holding fused expert weights (known layout or not), by name."""
    return {n: m for n, m in root.named_modules() if fused_weights(m)}


def unfuse_experts_(root: nn.Module, keep) -> list[str]:
    """Replace every experts module under ``root`` whose projections ``keep`` passes (``keep(f"{name}.{proj}")``)
    by a ``RoutedExperts``; a module of unknown layout that ``keep`` passes raises ``ValueError`` (one line).
    Returns the names replaced."""
    done = []
    for name, module in list(find_experts(root).items()):
        if not any(keep(f"{name}.{p}") for p in fused_weights(module)):
            continue
        layout = experts_layout(module)
        if layout is None:
            raise ValueError(unknown_layout_error(name, module))
        _set_submodule(root, name, RoutedExperts(module, layout))
        done.append(name)
    return done


def fuse_experts_(root: nn.Module) -> dict[str, str]:
    """Replace every ``RoutedExperts`` under ``root`` with a quantized projection by a ``QuantExperts`` (a projection
    whose experts all stayed float keeps its fused float tensor), and every one whose experts are all float by its
    source module again. Returns ``{name: problem}`` for the ones left as they are: experts of one projection with
    different quantized tensors (shapes or classes) or partly float."""
    problems = {}
    for name, module in list(root.named_modules()):
        if not isinstance(module, RoutedExperts):
            continue
        layout, stacks, problem = module.layout, {}, None
        for proj in layout.projections:
            mods = module.expert_modules(proj)
            floats = sum(isinstance(m, ExpertLinear) for m in mods)
            if 0 < floats < len(mods) or (floats == 0 and not _stackable(mods)):
                problem = f"{proj}: the experts were not quantized alike"
            stacks[proj] = module._parameters[proj] if floats else None
        if problem is not None:
            problems[name] = problem
        elif all(s is not None for s in stacks.values()):
            _set_submodule(root, name, module._source)
        else:
            stacks = {p: s if s is not None else StackedExperts.from_modules(module.expert_modules(p))
                      for p, s in stacks.items()}
            biases = {p: module._parameters.get(layout.bias_name(p)) for p in layout.projections if layout.has_bias}
            _set_submodule(root, name, QuantExperts(_strip(module._source), layout, stacks, biases))
    return problems


def _stackable(mods: list[nn.Module]) -> bool:
    """One class, tensors of one shape and dtype, one description (bits, group size, block type...)."""
    def signature(m):
        return type(m), m.extra_repr(), [(n, p.shape, p.dtype) for n, p in m.named_parameters(recurse=False)]
    first = signature(mods[0])
    return all(signature(m) == first for m in mods)


def _strip(source: nn.Module) -> nn.Module:
    """``source`` without its fused float parameters (kept only for its gate function and constants)."""
    for name in [n for n, _ in source.named_parameters(recurse=False)]:
        source._parameters[name] = None
    return source


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quant_experts_skeleton(source: nn.Module, layout: ExpertsLayout,
                           templates: dict[str, nn.Module | None]) -> QuantExperts:
    """An empty ``QuantExperts`` (meta tensors) for a checkpoint to load into: ``templates`` maps each projection to
    one expert's quantized module skeleton, or to ``None`` for a projection saved float (its fused tensor)."""
    stacks = {p: StackedExperts(t, layout.num_experts) if t is not None else getattr(source, p)
              for p, t in templates.items()}
    biases = {p: getattr(source, layout.bias_name(p)) for p in layout.projections if layout.has_bias}
    return QuantExperts(_strip(source), layout, stacks, biases)


def _num_experts(module: nn.Module) -> int | None:
    if isinstance(module, (RoutedExperts, QuantExperts)):
        return module.layout.num_experts
    fused = fused_weights(module)
    return next(iter(fused.values())).shape[0] if fused else None


def router_names(root: nn.Module) -> list[str]:
    """The routers beside each experts module: modules of its parent block, outside the experts, whose 2-D ``weight``
    has one row per expert (a router) or a single row (a shared expert's gate). They stay float (tiny, and routing
    is fragile)."""
    names = set()
    for name, module in root.named_modules():
        n_experts = _num_experts(module) if name else None
        if n_experts is None:
            continue
        parent_name = name.rpartition(".")[0]
        parent = root.get_submodule(parent_name) if parent_name else root
        for child_name, child in parent.named_modules():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            w = child._parameters.get("weight")
            if (w is not None and w.dim() == 2 and w.shape[0] in (n_experts, 1) and full != name
                    and not full.startswith(name + ".")):
                names.add(full)
    return sorted(names)
