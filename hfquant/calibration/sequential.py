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

The per-group solve is a callback, so this module knows nothing of GPTQ itself. How a run executes (progress,
resume, hidden-state store, processes, callbacks, output caching, the asymmetric stream, refinement) is one
``BlockRunOptions``; the pieces a block is run with (recorded inputs, groups, Hessian statistics, hook helpers) are
in ``hfquant.calibration.blocks``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from hfquant.calibration.blocks import (add_idle_experts, BlockInputs, call_block, capture_block_inputs, discover_groups,
                                        float_group_inputs, Group, HessianStat, hooked, plan_stages, replaying,
                                        StopForward)
from hfquant.calibration.distributed import Dist
from hfquant.calibration.spill import HiddenStore
from hfquant.nn.graph import find_blocks, in_out_features, quantizable_modules

logger = logging.getLogger(__name__)

SolveFn = Callable[..., None]
"""``solve(block_name, group, hessian)``, or ``solve(block_name, group, hessian, cross=...)`` in an asymmetric
run: quantize the group's modules in place (weights replaced by their dequantized values) and remember the
results."""


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


@dataclass
class BlockRunOptions:
    """How ``calibrate_blocks_`` runs (``run_block`` reads ``dist``, ``cache_outputs`` and ``refine``).

    * ``progress``: a progress bar over the blocks;
    * ``resume``: blocks it reports finished are skipped (their inputs replaced by the saved hidden states) and
      every finished block is reported to it;
    * ``store``: keeps the hidden states between blocks (default: in memory where computed);
    * ``dist``: reduces the Hessians over the calibration processes (each holds its own batches);
    * ``callbacks``: run around the capture and each block;
    * ``cache_outputs=False``: recompute already-quantized modules in later stages instead of replaying their
      cached outputs (same numbers, less memory, more compute);
    * ``asymmetric``: also carry the float model's hidden states (module docstring); ``resume`` then saves both
      streams;
    * ``refine(block_name, block, inputs, targets)``: called once a block's groups are solved, with the float
      block's outputs as ``targets`` (needs ``asymmetric``), to tune the block's quantized weights in place
      (``hfquant.quantize.reconstruct``); the block's outputs are then computed afresh.
    """

    progress: bool = True
    resume: BlockResume | None = None
    store: HiddenStore | None = None
    dist: Dist | None = None
    callbacks: BlockCallbacks | None = None
    cache_outputs: bool = True
    asymmetric: bool = False
    refine: Callable[..., None] | None = None


@dataclass
class Stream:
    """One stream of hidden states through a block: its ``inputs``, one per calibration batch, and ``sink(b,
    output)`` receiving its outputs (``None``: ``run_block`` returns the quantized stream's outputs instead)."""

    inputs: Sequence[BlockInputs]
    sink: Callable[[int, torch.Tensor], None] | None = None


class _BlockRun:
    """The state ``run_block``'s steps share: the block's modules already quantized (``done``), their cached
    outputs per batch (``cache``), the batch being run (``batch[0]``, read by replayed modules) and, in an
    asymmetric run, the float copy of the block with the current batch's float inputs of the stage's groups."""

    def __init__(self, block: nn.Module, block_name: str, stream: Stream, float_stream: Stream | None,
                 options: BlockRunOptions, dist: Dist):
        self.block, self.block_name, self.inputs, self.float_stream = block, block_name, stream.inputs, float_stream
        self.dist, self.cache_outputs = dist, options.cache_outputs
        self.cache: dict[str, list] = {}
        self.done: dict[str, nn.Module] = {}
        self.batch = [0]
        self.float_block = copy.deepcopy(block) if float_stream is not None else None
        self.float_x: list = []  # the current batch's float inputs of the stage's groups

    def stage(self, stage: list[Group], solve: SolveFn) -> None:
        """Collect the statistics of the stage's groups, then solve them."""
        self.solve(stage, self.capture(stage), solve)

    def new_stats(self, stage: list[Group]) -> list[HessianStat]:
        """Zero statistics for each group of ``stage`` (with a cross sum in an asymmetric run)."""
        device = next(self.block.parameters()).device
        stats = []
        for g in stage:
            cols = in_out_features(g.modules[0])[0]
            # An expert's rows in the float model are other tokens (its router chose differently): no cross term.
            crossed = self.float_block is not None and g.expert is None
            cross = torch.zeros(cols, cols, device=device) if crossed else None
            stats.append(HessianStat(torch.zeros(cols, cols, device=device), dist=self.dist, cross=cross))
        return stats

    def capture(self, stage: list[Group]) -> list[HessianStat]:
        """Run the block over every batch until all the stage's groups have seen their input, accumulating their
        statistics; modules quantized in earlier stages replay their outputs, cached the first time they run."""
        stats = self.new_stats(stage)
        pending = [len(stage)]
        handles = []
        crossed = [g.names[0] for g, st in zip(stage, stats) if st.cross is not None]
        for g, st in zip(stage, stats):
            k = crossed.index(g.names[0]) if st.cross is not None else None

            def pre(_m, args, _st=st, _k=k):
                _st.add(args[0], self.float_x[_k] if _k is not None else None, getattr(_m, "row_weights", None))
                pending[0] -= 1
                if pending[0] == 0:
                    raise StopForward
            handles.append(g.modules[0].register_forward_pre_hook(pre))
        cache = self.cache
        fresh = {n: m for n, m in self.done.items() if n not in cache} if self.cache_outputs else {}
        for n in fresh:
            cache[n] = []
            handles.append(fresh[n].register_forward_hook(lambda _m, _a, out, _n=n: cache[_n].append(out)))
        replay = {n: m for n, m in self.done.items() if n in cache and n not in fresh}
        with hooked(handles), replaying(replay, cache, self.batch), torch.no_grad():
            for b in range(len(self.inputs)):
                self.batch[0] = b
                pending[0] = len(stage)
                if crossed:
                    self.float_x[:] = float_group_inputs(self.float_block, crossed, self.float_stream.inputs[b])
                try:
                    call_block(self.block, self.inputs[b])
                except StopForward:
                    pass
        # Modules that ran in this stage but were not reached on some batch (should not happen) get no cache.
        for n in fresh:
            if len(cache[n]) != len(self.inputs):
                del cache[n]
        self.float_x.clear()
        return stats

    def solve(self, stage: list[Group], stats: list[HessianStat], solve: SolveFn) -> None:
        """Reduce each group's statistics over the processes and ``solve`` it; its modules are then quantized."""
        for g, st in zip(stage, stats):
            st.reduce()
            g.tokens = st.n
            if self.float_block is None:
                solve(self.block_name, g, st.normalized())
            else:
                solve(self.block_name, g, st.normalized(), cross=st.normalized_cross())
            for n, m in zip(g.names, g.modules):
                self.done[n] = m

    def float_outputs(self, keep: bool) -> list[torch.Tensor]:
        """Run the float copy of the block over every batch, its outputs to the float stream's sink, then drop the
        copy. Returns the outputs where ``keep`` (a refinement's targets), else ``[]`` (also without a float copy)."""
        targets = []
        if self.float_block is not None:
            with torch.no_grad():
                for b in range(len(self.float_stream.inputs)):
                    out = call_block(self.float_block, self.float_stream.inputs[b])
                    self.float_stream.sink(b, out)
                    if keep:
                        targets.append(out)
            self.float_block = None
        return targets

    def refine(self, refine: Callable[..., None], targets: list[torch.Tensor]) -> None:
        """Tune the quantized block against ``targets``; the modules' cached outputs predate the tuning."""
        refine(self.block_name, self.block, self.inputs, targets)
        self.cache.clear()

    def outputs(self, sink: Callable[[int, torch.Tensor], None] | None) -> list[torch.Tensor]:
        """Run the quantized block over every batch, each output to ``sink`` (returned instead where ``None``)."""
        outputs = []
        replay = {n: m for n, m in self.done.items() if n in self.cache}
        with replaying(replay, self.cache, self.batch), torch.no_grad():
            for b in range(len(self.inputs)):
                self.batch[0] = b
                out = call_block(self.block, self.inputs[b])
                if sink is None:
                    outputs.append(out)
                else:
                    sink(b, out)
        return outputs


def run_block(block: nn.Module, block_name: str, modules: dict[str, nn.Module], stream: Stream, solve: SolveFn,
              true_sequential: bool = True, *, options: BlockRunOptions | None = None,
              float_stream: Stream | None = None) -> list[torch.Tensor]:
    """Quantize one block's modules with ``solve`` and return the block's outputs for every batch of ``stream``.

    ``stream.sink(b, output)``: hand each output over instead of returning them (returns ``[]``).
    ``float_stream``: the float model's inputs of this block, one per batch, and the sink of its outputs (an
    asymmetric run, module docstring): a float copy of the block, taken before any module is quantized, gives
    each group's float input for its cross term (``solve`` gets ``cross=``).
    ``options``: ``dist`` reduces the Hessians over the calibration processes (each holds its own inputs);
    ``cache_outputs`` and ``refine`` (needs ``float_stream``) as ``BlockRunOptions`` says.
    """
    options = options or BlockRunOptions()
    dist = options.dist or Dist()
    groups, uncalled = add_idle_experts(*discover_groups(block, modules, stream.inputs), modules)
    for name in uncalled:
        logger.warning("%s.%s was not called during calibration; it is quantized without data (RTN)", block_name, name)
    stages = plan_stages(groups, true_sequential)
    run = _BlockRun(block, block_name, stream, float_stream, options, dist)
    for stage in stages:
        run.stage(stage, solve)
    targets = run.float_outputs(keep=options.refine is not None)
    if options.refine is not None:
        run.refine(options.refine, targets)
    return run.outputs(stream.sink)


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


@dataclass
class _Hidden:
    """The hidden states between blocks, in ``store``: batch ``b``'s at ``b`` and, in an asymmetric run, the float
    model's at ``n + b``; ``inputs`` (and ``float_inputs``) read them as the current block's inputs."""

    store: HiddenStore
    n: int
    device: torch.device
    inputs: _Inputs
    float_inputs: _Inputs | None

    @property
    def streams(self) -> int:
        return 1 if self.float_inputs is None else 2


def _capture(model: nn.Module, block: nn.Module, batches: list[torch.Tensor], store: HiddenStore | None,
             asymmetric: bool) -> _Hidden:
    """Record ``block``'s inputs for every batch and put their hidden states in ``store`` (a new in-memory one
    where ``None``), twice in an asymmetric run (the float stream starts equal)."""
    records = capture_block_inputs(model, block, batches)
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
    return _Hidden(store, n, device, _Inputs(base, store), _Inputs(base, store, offset=n) if asymmetric else None)


def _resume(resume: BlockResume | None, hidden: _Hidden, n_blocks: int) -> int:
    """The first block to run: where ``resume`` starts, its saved hidden states put in the store."""
    if resume is None:
        return 0
    first, saved = resume.start()
    if first:
        logger.info("resuming at block %d of %d", first, n_blocks)
        if len(saved) != hidden.streams * hidden.n:
            raise ValueError("saved hidden states do not match the calibration batches (or the run's quality "
                             "settings changed since it was saved); start again without --resume")
        for b, h in enumerate(saved):
            hidden.store.put(b, h.to(hidden.device))
        hidden.store.advance()
    return first


def _calibrate_block(block: nn.Module, name: str, keep: Callable[[str], bool], solve: SolveFn, true_sequential: bool,
                     options: BlockRunOptions, hidden: _Hidden) -> list[str]:
    """Quantize one block's selected modules (or only run it where there are none), its outputs put in the store
    as the next block's hidden states. Returns the names of the modules quantized."""
    modules = quantizable_modules(block, keep, prefix=name)
    store, n = hidden.store, hidden.n
    if not modules:
        with torch.no_grad():
            for b in range(n):
                store.put(b, call_block(block, hidden.inputs[b]))
                if options.asymmetric:
                    store.put(n + b, call_block(block, hidden.float_inputs[b]))
        return []
    float_stream = Stream(hidden.float_inputs, lambda b, t: store.put(n + b, t)) if options.asymmetric else None
    run_block(block, name, modules, Stream(hidden.inputs, store.put), solve, true_sequential, options=options,
              float_stream=float_stream)
    return [f"{name}.{m}" for m in modules]


def calibrate_blocks_(model: nn.Module, batches: list[torch.Tensor], keep: Callable[[str], bool], solve: SolveFn,
                      true_sequential: bool = True, *, options: BlockRunOptions | None = None) -> list[str]:
    """Run block-by-block calibration over the whole model. Returns the names of the modules quantized now.

    ``batches``: this process's calibration batches of token ids; ``keep(name)``: whether a module is quantized;
    ``solve``: quantizes one group (``SolveFn``); ``options``: how the run executes (``BlockRunOptions``).
    """
    opts = options or BlockRunOptions()
    cb = opts.callbacks or BlockCallbacks()
    blocks_name, blocks = find_blocks(model)
    hidden = _capture(model, blocks[0], batches, opts.store, opts.asymmetric)
    if cb.after_capture is not None:
        cb.after_capture()
    first = _resume(opts.resume, hidden, len(blocks))
    quantized = []
    it = range(first, len(blocks))
    if opts.progress:
        it = tqdm(it, desc="quantizing blocks", unit="block", initial=first, total=len(blocks))
    for i in it:
        name = f"{blocks_name}.{i}"
        if cb.before_block is not None:
            cb.before_block(i)
        quantized.extend(_calibrate_block(blocks[i], name, keep, solve, true_sequential, opts, hidden))
        hidden.store.advance()
        if opts.resume is not None:
            opts.resume.done(i, name, [hidden.store.get(b) for b in range(hidden.streams * hidden.n)])
        if cb.after_block is not None:
            cb.after_block(i, name)
    hidden.store.close()
    return quantized
