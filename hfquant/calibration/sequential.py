"""Block-by-block calibration: each block sees the outputs of the already-quantized blocks before it.

Per block (GPTQ reference ``llama.py``/``opt.py`` loop, with true-sequential as in its README):

1. The block's quantizable modules are grouped by shared input, in execution order, by running it
   once and noting which input tensor each module reads (q/k/v read one tensor, gate/up another).
2. With ``true_sequential``, one *stage* per group: the block runs over all calibration batches until
   the group's input is seen (a pre-hook accumulates ``X^T X`` and stops the forward there), then the
   group is quantized and its weights replaced by their dequantized values, so later groups see
   quantized outputs. Without it, a single stage collects every group's Hessian from the float block.
3. Modules quantized in an earlier stage do not recompute: their outputs are cached the first time they
   run quantized and replayed afterwards, so the block's Linears run about once in total.
4. Finally the block runs in full and its outputs become the next block's inputs.

With ``asymmetric`` (GPTAQ, Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration", ICML 2025, arXiv 2504.02692), a second stream of hidden states runs through a float copy of
each block, as in the float model: every group also accumulates ``sum (X_float - X)^T X`` (its *cross* term,
``X`` its input in the quantized model, ``X_float`` the same input in the float model), which lets the solve
aim at the float model's outputs instead of the float layer applied to quantized inputs. The float stream is
kept in the same ``HiddenStore`` (batches ``n .. 2n - 1``), so spilling to disk and resuming carry it too.

The per-group solve is a callback, so this module knows nothing of GPTQ itself.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from hfquant.calibration.distributed import Dist
from hfquant.calibration.graph import find_blocks, in_out_features, quantizable_modules
from hfquant.calibration.spill import HiddenStore

logger = logging.getLogger(__name__)


class _Stop(Exception):
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

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """Add one batch's inputs ``x``; with a ``cross`` sum, also ``(x_float - x)^T x`` (same shape as ``x``)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.h.device, dtype=torch.float32)
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
    """Modules of one block that read the same input, in execution order."""

    names: list[str]
    modules: list[nn.Module] = field(repr=False)


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _replaying(modules: dict[str, nn.Module], cache: dict[str, list], batch: list[int]):
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


def discover_groups(block: nn.Module, modules: dict[str, nn.Module], inp: BlockInputs) -> tuple[list[Group], list[str]]:
    """Group ``modules`` by the input tensor they read, in call order. Returns (groups, never-called names)."""
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
    with _hooks(handles), torch.no_grad():
        call_block(block, inp)
    groups = [Group(seen[k], [modules[n] for n in seen[k]]) for k in order]
    called = {n for g in groups for n in g.names}
    return groups, [n for n in modules if n not in called]


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[BlockInputs]:
    """Run the model on each batch of token ids up to ``block`` and record that block's inputs."""
    records: list[BlockInputs] = []

    def pre(_m, args, kwargs):
        records.append(BlockInputs(list(args), dict(kwargs)))
        raise _Stop

    call_kwargs = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        call_kwargs["use_cache"] = False
    device = next(model.parameters()).device
    with _hooks([block.register_forward_pre_hook(pre, with_kwargs=True)]), torch.no_grad():
        for ids in batches:
            try:
                model(input_ids=ids.to(device), **call_kwargs)
            except _Stop:
                pass
    return records


SolveFn = Callable[..., None]
"""``solve(block_name, group, hessian)``, or ``solve(block_name, group, hessian, cross=...)`` in an asymmetric
run: quantize the group's modules in place (weights replaced by their dequantized values) and remember the
results."""


def _float_group_inputs(float_block: nn.Module, names: list[str], inp: BlockInputs) -> list[torch.Tensor]:
    """The inputs of the modules ``names`` (one per group) when the float copy of the block runs on ``inp``."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def pre(_m, args, _name=name):
            found.setdefault(_name, args[0])
            if len(found) == len(names):
                raise _Stop
        handles.append(float_block.get_submodule(name).register_forward_pre_hook(pre))
    with _hooks(handles), torch.no_grad():
        try:
            call_block(float_block, inp)
        except _Stop:
            pass
    return [found[n] for n in names]


def run_block(block: nn.Module, block_name: str, modules: dict[str, nn.Module], inputs: Sequence[BlockInputs],
              solve: SolveFn, true_sequential: bool = True, *, dist: Dist | None = None,
              sink: Callable[[int, torch.Tensor], None] | None = None, cache_outputs: bool = True,
              float_inputs: Sequence[BlockInputs] | None = None,
              float_sink: Callable[[int, torch.Tensor], None] | None = None,
              refine: Callable[..., None] | None = None) -> list[torch.Tensor]:
    """Quantize one block's modules with ``solve`` and return the block's outputs for every batch.

    ``float_inputs``: the float model's inputs of this block, one per batch (an asymmetric run, module
    docstring): a float copy of the block, taken before any module is quantized, gives each group's float input
    for its cross term (``solve`` gets ``cross=``), and its outputs go to ``float_sink(b, output)``.
    ``refine(block_name, block, inputs, targets)``: called once every group is solved, with the float block's
    outputs as ``targets`` (needs ``float_inputs``), to tune the block's quantized weights in place
    (``hfquant.calibration.reconstruct``); the block's outputs are then computed afresh.

    ``dist``: reduce the Hessians over the calibration processes (each holds its own ``inputs``).
    ``sink(b, output)``: hand each output over instead of returning them (returns ``[]``).
    ``cache_outputs=False``: recompute already-quantized modules in later stages instead of replaying their
    cached outputs (same numbers, less memory, more compute).
    """
    dist = dist or Dist()
    groups, uncalled = discover_groups(block, modules, inputs[0])
    for name in uncalled:
        logger.warning("%s.%s was not called during calibration; it is quantized without data (RTN)", block_name, name)
    stages = [[g] for g in groups] if true_sequential else [groups]
    cache: dict[str, list] = {}
    done: dict[str, nn.Module] = {}
    batch = [0]
    float_block = copy.deepcopy(block) if float_inputs is not None else None
    float_x: list = []  # the current batch's float inputs of the stage's groups

    for stage in stages:
        device = next(block.parameters()).device
        stats = []
        for g in stage:
            cols = in_out_features(g.modules[0])[0]
            cross = torch.zeros(cols, cols, device=device) if float_block is not None else None
            stats.append(HessianStat(torch.zeros(cols, cols, device=device), dist=dist, cross=cross))
        pending = [len(stage)]
        handles = []
        for k, (g, st) in enumerate(zip(stage, stats)):
            def pre(_m, args, _st=st, _k=k):
                _st.add(args[0], float_x[_k] if float_x else None)
                pending[0] -= 1
                if pending[0] == 0:
                    raise _Stop
            handles.append(g.modules[0].register_forward_pre_hook(pre))
        fresh = {n: m for n, m in done.items() if n not in cache} if cache_outputs else {}
        for n in fresh:
            cache[n] = []
            handles.append(fresh[n].register_forward_hook(lambda _m, _a, out, _n=n: cache[_n].append(out)))
        replay = {n: m for n, m in done.items() if n in cache and n not in fresh}
        with _hooks(handles), _replaying(replay, cache, batch), torch.no_grad():
            for b in range(len(inputs)):
                batch[0] = b
                pending[0] = len(stage)
                if float_block is not None:
                    float_x[:] = _float_group_inputs(float_block, [g.names[0] for g in stage], float_inputs[b])
                try:
                    call_block(block, inputs[b])
                except _Stop:
                    pass
        # Modules that ran in this stage but were not reached on some batch (should not happen) get no cache.
        for n in fresh:
            if len(cache[n]) != len(inputs):
                del cache[n]
        float_x.clear()
        for g, st in zip(stage, stats):
            st.reduce()
            if float_block is None:
                solve(block_name, g, st.normalized())
            else:
                solve(block_name, g, st.normalized(), cross=st.normalized_cross())
            for n, m in zip(g.names, g.modules):
                done[n] = m
        del stats

    targets = []
    if float_block is not None:
        with torch.no_grad():
            for b in range(len(float_inputs)):
                out = call_block(float_block, float_inputs[b])
                float_sink(b, out)
                if refine is not None:
                    targets.append(out)
        del float_block
    if refine is not None:
        refine(block_name, block, inputs, targets)
        cache.clear()  # the modules' cached outputs predate the tuning
    outputs = []
    replay = {n: m for n, m in done.items() if n in cache}
    with _replaying(replay, cache, batch), torch.no_grad():
        for b in range(len(inputs)):
            batch[0] = b
            out = call_block(block, inputs[b])
            if sink is None:
                outputs.append(out)
            else:
                sink(b, out)
    return outputs


class BlockResume(Protocol):
    """Saves and restores per-block progress for ``calibrate_blocks_`` (see ``hfquant.quantize.weight_only``)."""

    def start(self) -> tuple[int, list[torch.Tensor] | None]:
        """Number of finished blocks, and the hidden states entering the first unfinished one."""

    def done(self, index: int, block_name: str, outputs: list[torch.Tensor]) -> None:
        """Block ``index`` is quantized; ``outputs`` are the next block's hidden states."""


@dataclass
class BlockCallbacks:
    """Optional steps around ``calibrate_blocks_``'s loop (layer-wise onloading, per-block swapping)."""

    after_capture: Callable[[], None] | None = None      # the block-0 inputs are recorded
    before_block: Callable[[int], None] | None = None     # block i is about to run
    after_block: Callable[[int, str], None] | None = None  # block i (named) is quantized and has run


class _Inputs(Sequence):
    """Each batch's recorded block inputs with its current hidden state taken from a ``HiddenStore``."""

    def __init__(self, base: list[BlockInputs], store: HiddenStore, offset: int = 0):
        self.base, self.store, self.offset = base, store, offset

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, b):
        if not 0 <= b < len(self.base):
            raise IndexError(b)
        return self.base[b].with_hidden(self.store.get(self.offset + b))


def _hidden_of(inp: BlockInputs) -> torch.Tensor:
    return inp.args[0] if inp.args else inp.kwargs["hidden_states"]


def calibrate_blocks_(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool], solve: SolveFn,
                      true_sequential: bool = True, progress: bool = True,
                      resume: BlockResume | None = None, *, store: HiddenStore | None = None,
                      dist: Dist | None = None, callbacks: BlockCallbacks | None = None,
                      cache_outputs: bool = True, asymmetric: bool = False,
                      refine: Callable[..., None] | None = None) -> list[str]:
    """Run block-by-block calibration over the whole model. Returns the names of the modules quantized now.

    With ``resume``, blocks it reports finished are skipped (their inputs replaced by the saved hidden
    states) and every finished block is reported to it. ``store`` keeps the hidden states between blocks
    (default: in memory where computed); ``dist`` reduces statistics over calibration processes (``batches``
    are then this process's share); ``callbacks`` run around the capture and each block. ``asymmetric``: also
    carry the float model's hidden states (module docstring); the resume store then saves both streams.
    ``refine``: ``run_block``'s, for every block (needs ``asymmetric``).
    """
    cb = callbacks or BlockCallbacks()
    blocks_name, blocks = find_blocks(model)
    records = capture_block_inputs(model, blocks[0], batches)
    device = _hidden_of(records[0]).device
    if store is None:
        store = HiddenStore(device)
    n = len(records)
    streams = 2 if asymmetric else 1
    for b, rec in enumerate(records):
        for k in range(streams):
            store.put(k * n + b, _hidden_of(rec))
    store.advance()
    base = [rec.with_hidden(None) for rec in records]
    inputs = _Inputs(base, store)
    float_inputs = _Inputs(base, store, offset=n) if asymmetric else None
    del records
    if cb.after_capture is not None:
        cb.after_capture()
    first = 0
    if resume is not None:
        first, hidden = resume.start()
        if first:
            logger.info("resuming at block %d of %d", first, len(blocks))
            if len(hidden) != streams * n:
                raise ValueError("saved hidden states do not match the calibration batches (or the run's quality "
                                 "settings changed since it was saved); start again without --resume")
            for b, h in enumerate(hidden):
                store.put(b, h.to(device))
            store.advance()
    quantized = []
    it = range(first, len(blocks))
    if progress:
        it = tqdm(it, desc="quantizing blocks", unit="block", initial=first, total=len(blocks))
    for i in it:
        name = f"{blocks_name}.{i}"
        if cb.before_block is not None:
            cb.before_block(i)
        modules = quantizable_modules(blocks[i], keep, prefix=name)
        if not modules:
            with torch.no_grad():
                for b in range(n):
                    store.put(b, call_block(blocks[i], inputs[b]))
                    if asymmetric:
                        store.put(n + b, call_block(blocks[i], float_inputs[b]))
        else:
            run_block(blocks[i], name, modules, inputs, solve, true_sequential, dist=dist, sink=store.put,
                      cache_outputs=cache_outputs, float_inputs=float_inputs,
                      float_sink=(lambda b, t: store.put(n + b, t)) if asymmetric else None, refine=refine)
            quantized.extend(f"{name}.{m}" for m in modules)
        store.advance()
        if resume is not None:
            resume.done(i, name, [store.get(b) for b in range(streams * n)])
        if cb.after_block is not None:
            cb.after_block(i, name)
    store.close()
    return quantized
