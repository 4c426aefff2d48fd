"""The pieces ``hfquant.calibration.sequential`` runs a block with.

* ``BlockInputs``, ``capture_block_inputs``, ``call_block``: a calibration batch's recorded arguments at a block's
  entry, how they are recorded, and how the block runs on them;
* ``Group``, ``discover_groups``: a block's quantizable modules grouped by the input tensor they read;
* ``HessianStat``: the running ``sum X^T X`` of one input (and its asymmetric cross term), reduced over processes;
* forward-hook helpers: ``StopForward`` ends a forward pass from a hook, ``hooked`` removes hooks on leaving,
  ``replaying`` makes modules return cached outputs, ``float_group_inputs`` reads groups' inputs in a float block.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from hfquant.calibration.distributed import Dist
from hfquant.nn.expert_linear import ExpertLinear


class StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class BlockInputs:
    """Positional and keyword arguments of one calibration batch at a block's entry."""

    args: list
    kwargs: dict

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        if self.args:
            return BlockInputs([hidden, *self.args[1:]], self.kwargs)
        return BlockInputs([], {**self.kwargs, "hidden_states": hidden})


@dataclass
class HessianStat:
    """Running ``sum_b X_b^T X_b`` (float32, on ``h``'s device) and token count for one input.

    Each batch's product ``P_b = X_b^T X_b`` is one GEMM of its own, added to the running sum in batch order:
    ``H = (((0 + P_0) + P_1) + ...)``. With a multi-process ``dist``, every rank computes its own batches'
    products during its forward passes (the costly part, in parallel); ranks after the first keep them
    (``pending``) until ``reduce`` chains the additions through the ranks in batch order, so the total is the
    one-process ``H`` bit for bit (see ``hfquant.calibration.distributed``). Where a product is larger than
    its batch's inputs (``cols > tokens``), the inputs are kept instead and multiplied in the chain.
    """

    h: torch.Tensor
    n: int = 0
    dist: Dist = field(default_factory=Dist)
    pending: list = field(default_factory=list, repr=False)
    cross: torch.Tensor | None = None
    cross_pending: list = field(default_factory=list, repr=False)

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
        """Add one batch's inputs ``x``; with a ``cross`` sum, also ``(x_float - x)^T x`` (same shape as ``x``).
        ``weights`` (one per row of ``x``, e.g. an expert's routing weights): ``sum w^2 x^T x`` instead, the rows
        scaled by the factor their output error is scaled by."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.h.device, dtype=torch.float32)
        if weights is not None:
            x = x * weights.detach().reshape(-1, 1).to(device=x.device, dtype=torch.float32)
        c = None
        if self.cross is not None:
            d = x_float.detach().reshape(x.shape).to(device=x.device, dtype=torch.float32) - x
            c = d.t() @ x
        if self.dist.rank > 0:
            small = x.shape[1] <= x.shape[0]
            self.pending.append((True, x.t() @ x) if small else (False, x.clone()))
            if c is not None:
                self.cross_pending.append(c)
        else:
            self.h.add_(x.t() @ x)
            if c is not None:
                self.cross.add_(c)
        self.n += x.shape[0]

    def reduce(self) -> None:
        """Make ``h``, ``cross`` and ``n`` the totals over every process (a no-op for a single process)."""
        if self.dist.active:
            self.dist.chain_add_(self.h, (p if is_product else p.t() @ p for is_product, p in self.pending))
            self.pending.clear()
            if self.cross is not None:
                self.dist.chain_add_(self.cross, iter(self.cross_pending))
                self.cross_pending.clear()
            self.n = self.dist.sum_int(self.n, self.h.device)

    def normalized(self) -> torch.Tensor:
        """``2/n * sum X^T X``, the reference's scaling."""
        return self.h * (2.0 / max(self.n, 1))

    def normalized_cross(self) -> torch.Tensor | None:
        """``2/n * sum (X_float - X)^T X`` (scaled as ``normalized``), or ``None`` without a cross sum."""
        return None if self.cross is None else self.cross * (2.0 / max(self.n, 1))


@dataclass
class Group:
    """Modules of one block that read the same input, in execution order. ``tokens``: the rows of input its
    statistics saw (set before its solve)."""

    names: list[str]
    modules: list[nn.Module] = field(repr=False)
    tokens: int = 0

    @property
    def expert(self) -> ExpertLinear | None:
        """The group's ``ExpertLinear`` (one expert's projection of a fused MoE module, alone in its group), or
        ``None``."""
        m = self.modules[0]
        return m if isinstance(m, ExpertLinear) else None


def plan_stages(groups: list[Group], true_sequential: bool) -> list[list[Group]]:
    """The stages a block's groups are solved in: one per group with ``true_sequential`` (all in one without), except
    that one projection of every expert of a fused MoE module is one stage, at its first expert's place (a pass over
    the calibration batches collects every expert's statistics; later stages see them all quantized), its groups in
    expert order."""
    stages: list[list[Group]] = []
    by_key: dict[tuple, list[Group]] = {}
    for g in groups:
        e = g.expert
        key = None if e is None else (id(e._owner), e.proj)
        if key is not None and key in by_key:
            by_key[key].append(g)
            continue
        stages.append([g])
        if key is not None:
            by_key[key] = stages[-1]
    for stage in by_key.values():  # expert order, not call order: the same on every process
        stage.sort(key=lambda g: g.expert.index)
    return stages if true_sequential else [[g for stage in stages for g in stage]]


def add_idle_experts(groups: list[Group], uncalled: list[str],
                     modules: dict[str, nn.Module]) -> tuple[list[Group], list[str]]:
    """Experts the router never chose on these batches still get a group (statistics of zero tokens, so the run's
    fallback rule decides; with several processes another one may have routed tokens to them, and every process
    must reduce the same groups). Returns the groups and the names still uncalled."""
    idle = [n for n in uncalled if isinstance(modules[n], ExpertLinear)]
    return groups + [Group([n], [modules[n]]) for n in idle], [n for n in uncalled if n not in idle]


@contextmanager
def hooked(handles: list):
    """Remove the hooks ``handles`` (from ``register_forward_*hook``) when the ``with`` block exits."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replaying(modules: dict[str, nn.Module], cache: dict[str, list], batch: list[int]):
    """Make each module return its cached output for the current batch instead of computing."""
    saved = {}
    for name, m in modules.items():
        saved[name] = m.__dict__.get("forward")
        m.forward = (lambda _n: (lambda *a, **k: cache[_n][batch[0]]))(name)
    try:
        yield
    finally:
        for name, m in modules.items():
            if saved[name] is None:
                del m.forward
            else:
                m.forward = saved[name]


def call_block(block: nn.Module, inp: BlockInputs):
    """Run ``block`` on recorded inputs and return its hidden-state output."""
    out = block(*inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def discover_groups(block: nn.Module, modules: dict[str, nn.Module],
                    inputs: Sequence[BlockInputs]) -> tuple[list[Group], list[str]]:
    """Group ``modules`` by the input tensor they read, in call order, running the block on the first batch of
    ``inputs``, then on the next ones while some module has not been called (experts the router has not chosen
    yet). Returns (groups, names never called on any batch)."""
    seen: dict[int, list[str]] = {}
    keep_alive = []
    order: list[int] = []
    handles = []
    for name, m in modules.items():
        def pre(_m, args, _name=name):
            x = args[0]
            keep_alive.append(x)
            key = id(x)
            if key not in seen:
                seen[key] = []
                order.append(key)
            if _name not in seen[key]:
                seen[key].append(_name)
        handles.append(m.register_forward_pre_hook(pre))
    called: set[str] = set()
    with hooked(handles), torch.no_grad():
        for inp in inputs:
            call_block(block, inp)
            called = {n for k in order for n in seen[k]}
            if len(called) == len(modules):
                break
    groups = [Group(seen[k], [modules[n] for n in seen[k]]) for k in order]
    return groups, [n for n in modules if n not in called]


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[BlockInputs]:
    """Run the model on each batch of token ids up to ``block`` and record that block's inputs."""
    records: list[BlockInputs] = []

    def pre(_m, args, kwargs):
        records.append(BlockInputs(list(args), dict(kwargs)))
        raise StopForward

    call_kwargs = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        call_kwargs["use_cache"] = False
    device = next(model.parameters()).device
    with hooked([block.register_forward_pre_hook(pre, with_kwargs=True)]), torch.no_grad():
        for ids in batches:
            try:
                model(input_ids=ids.to(device), **call_kwargs)
            except StopForward:
                pass
    return records


def float_group_inputs(float_block: nn.Module, names: list[str], inp: BlockInputs) -> list[torch.Tensor]:
    """The inputs of the modules ``names`` (one per group) when the float copy of the block runs on ``inp``."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def pre(_m, args, _name=name):
            found.setdefault(_name, args[0])
            if len(found) == len(names):
                raise StopForward
        handles.append(float_block.get_submodule(name).register_forward_pre_hook(pre))
    with hooked(handles), torch.no_grad():
        try:
            call_block(float_block, inp)
        except StopForward:
            pass
    return [found[n] for n in names]
