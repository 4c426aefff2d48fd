"""Exact multi-process calibration: split the calibration batches across processes, reduce bit-exactly.

A single process accumulates every Hessian as ``H.add_(X_b^T @ X_b)`` over batches ``b = 0..B-1`` in order
(``HessianStat``): one GEMM per batch, then an elementwise addition. Summing per-process partial Hessians
(``all_reduce``) would add the same terms in another order, and float addition is not associative, so the
result would differ in the last bits. Instead each process gets a contiguous range of whole batches, computes
its batches' products ``X_b^T X_b`` during its own forward passes (the GEMMs, in parallel), and the running
sum is passed along a chain:

- rank 0 adds its products as a single process does (it starts from zeros too);
- rank ``r > 0`` keeps its products (or, where a product is larger than the batch, the inputs), receives the
  running ``H`` from rank ``r - 1``, adds its products in order, and sends it on;
- the last rank broadcasts the total.

So every process ends with exactly the single-process ``H`` (same operations, same operands, same order),
provided the GEMMs themselves give the same bits: same device type and the same number of intra-op threads
per process (``torch.set_num_threads``), since a GEMM's blocking can depend on it. Token counts are integers
and maxima are order-free, so those use ``all_reduce``. Only the elementwise additions of the chain are
sequential.

The GPTQ solves are shared out too (``solve_shared`` below). GPTQ treats the rows of a
weight independently given the Hessian factor, so on a CPU a module's rows are cut into slabs (``row_slabs``), as
many as there are ranks while they keep about ``SLAB_MIN_ROWS`` rows, cut at multiples of ``SLAB_ALIGN``; ``owners``
gives each slab to one rank, balancing their cost (``rows * cols^2``); every rank first solves all its slabs of a
stage, then each owner broadcasts its slabs' stored tensors (whatever the weight format stores, ``share_result``). The slabs' bits equal the whole solve's: a
row of a float32 GEMM does not depend on how many other rows are computed with it once there are 16 or more
(measured on MKL's AVX2 and AVX-512 kernels, 1 and 2 threads, 16- to 768-row slabs of SmolLM2's shapes; a
7-row slice differs, which is why slabs are never that small). The two-process tests compare every tensor
against one process. cuBLAS picks its algorithm by shape, so on CUDA each module stays whole (one owner).

The process group is the one ``torch.distributed`` already has (``accelerate launch`` / ``PartialState``
create it; gloo on CPU, NCCL on GPUs). Nothing here imports accelerate.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from accelerate import PartialState
import torch
import torch.distributed as td

from hfquant.core.errors import CalibrationError
from hfquant.core.gptq import GPTQResult, join_rows
from hfquant.core.weight_format import WeightFormat
from hfquant.nn.graph import in_out_features

# Row slabs of one GPTQ solve (``Dist.row_slabs``): at least this many rows each, cut at multiples of SLAB_ALIGN.
SLAB_MIN_ROWS = 64
SLAB_ALIGN = 16


def _collective(method):
    """A communication step: a peer that stopped (or a broken connection) becomes one line, not a gloo/NCCL trace."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as exc:  # torch.distributed.DistBackendError is a RuntimeError
            first = (str(exc).splitlines() or [""])[0][:160]
            raise CalibrationError(f"hfquant: calibration process {self.rank} of {self.world} lost contact with the others "
                                   f"in {method.__name__} ({first}); another process stopped, see its error; nothing "
                                   "was saved: fix that and rerun") from None

    return wrapper


@dataclass(frozen=True)
class Dist:
    """This process's place in the calibration group (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_range(self, n_batches: int) -> range:
        """This rank's contiguous share of ``n_batches`` whole batches (earlier ranks get the extra ones)."""
        if n_batches < self.world:
            raise CalibrationError(f"hfquant: {n_batches} calibration batches cannot be split across {self.world} "
                                   "processes; use more calibration samples, a smaller calibration batch size, "
                                   "or fewer processes")
        base, extra = divmod(n_batches, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    @_collective
    def chain_add_(self, h: torch.Tensor, products) -> None:
        """Finish ``h`` (rank 0's running sum, or zeros elsewhere) with every rank's batch ``products`` (an
        iterable, consumed in order), in rank order, exactly as one process adds them; afterwards every rank
        holds the total."""
        if self.rank > 0:
            td.recv(h, src=self.rank - 1)
            for p in products:
                h.add_(p)
        if self.rank < self.world - 1:
            td.send(h, dst=self.rank + 1)
        td.broadcast(h, src=self.world - 1)

    def row_slabs(self, rows: int, device) -> list[tuple[int, int]]:
        """Row ranges ``[(r0, r1), ...]`` a weight of ``rows`` rows is solved in: on a CPU one per rank, but no more
        than ``rows // SLAB_MIN_ROWS``, cut at the multiples of ``SLAB_ALIGN`` nearest to equal shares (so no slab
        has fewer than ``SLAB_MIN_ROWS - SLAB_ALIGN`` rows); elsewhere the whole weight."""
        n = min(self.world, rows // SLAB_MIN_ROWS) if torch.device(device).type == "cpu" else 1
        if n <= 1:
            return [(0, rows)]
        edges = [0, *(round(rows * k / n / SLAB_ALIGN) * SLAB_ALIGN for k in range(1, n)), rows]
        return list(zip(edges[:-1], edges[1:]))

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that does each unit of work of cost ``costs[i]``: longest first, each to the least loaded rank
        (the lower rank on ties). Deterministic, so every rank computes the same assignment."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    @_collective
    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        """``t`` takes rank ``src``'s values on every rank (in place)."""
        td.broadcast(t, src=src)

    @_collective
    def sum_int(self, n: int, device) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=device)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return int(t.item())

    @_collective
    def max(self, t: torch.Tensor, device) -> torch.Tensor:
        """Elementwise maximum of ``t`` over the processes (exact in any order), computed on ``device``."""
        u = t.to(device).clone()
        td.all_reduce(u, op=td.ReduceOp.MAX)
        return u.to(t.device)

    @_collective
    def from_main(self, value: float, device) -> float:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([value], dtype=torch.float64, device=device)
        td.broadcast(t, src=0)
        return float(t.item())

    @_collective
    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (``[rows_r, ...]``, rows may differ) concatenated along rows in rank order (= batch
        order for contiguous batch ranges). Tensors only: the sizes travel first, then padded blocks."""
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        td.all_gather(sizes, n)
        sizes = [int(x) for x in sizes]
        pad = torch.zeros(max(sizes), *t.shape[1:], dtype=t.dtype, device=t.device)
        pad[: t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        td.all_gather(parts, pad)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    @_collective
    def barrier(self) -> None:
        if self.active:
            td.barrier()


def current() -> Dist:
    """The ``Dist`` of the initialised ``torch.distributed`` group, or a single process when there is none."""
    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        return Dist(td.get_rank(), td.get_world_size())
    return Dist()


def init_from_env() -> Dist:
    """Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE > 1``), create the process group through
    accelerate's ``PartialState`` (gloo on CPU-only machines, NCCL on GPUs); otherwise a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState(cpu=not torch.cuda.is_available())
    return current()


def share_result(dist: Dist, res: GPTQResult | None, owner: int, unit: tuple, rows: int, device,
                 with_pre: bool = False) -> GPTQResult | None:
    """``owner``'s result of one GPTQ solve of ``rows`` rows of a module's weight, on every rank (``None`` everywhere
    when it failed). ``unit``: ``(module, weight format)``. The result travels as the format's stored tensors
    (``WeightFormat.fields``, received into ``WeightFormat.empty``), its row losses, and with ``with_pre`` the
    pre-rounding weight (block reconstruction starts from it)."""
    module, fmt = unit
    cols = in_out_features(module)[0]
    meta = torch.tensor([res is not None, res.damp if res else 0.0, res.retries if res else 0],
                        dtype=torch.float64, device=device)
    dist.broadcast_(meta, owner)
    if not meta[0]:
        return None
    if res is None:
        res = GPTQResult(format=fmt, stored=fmt.empty(rows, cols, device), cols=cols,
                         row_losses=torch.empty(rows, device=device), damp=float(meta[1]), retries=int(meta[2]),
                         pre=torch.empty(rows, cols, device=device) if with_pre else None)
    for t in (*res.stored, res.row_losses, *((res.pre,) if with_pre else ())):
        dist.broadcast_(t, owner)
    return res


def solve_shared(dist: Dist, units: list[tuple[torch.nn.Module, WeightFormat]], solve_rows, device,
                 with_pre: bool = False) -> list[GPTQResult | None]:
    """The GPTQ results of a stage's modules on every rank, the solves shared out among the ranks.

    ``units``: ``(module, weight format)`` per module; ``solve_rows(i, r0, r1)`` solves rows ``r0:r1`` of unit
    ``i``'s weight (called on their owner only). Each weight is cut into row slabs (``Dist.row_slabs``) owned by the
    ranks, balanced by cost; every rank first solves all its slabs, then the owners broadcast them in order, so
    the ranks solve at the same time. One process solves every weight whole, in order."""
    slabs = [(i, r0, r1) for i, (m, _) in enumerate(units) for r0, r1 in dist.row_slabs(in_out_features(m)[1], device)]
    owners = dist.owners([float(r1 - r0) * in_out_features(units[i][0])[0] ** 2 for i, r0, r1 in slabs])
    mine = {k: solve_rows(*slab) for k, (slab, owner) in enumerate(zip(slabs, owners)) if owner == dist.rank}
    parts: list[list] = [[] for _ in units]
    for k, ((i, r0, r1), owner) in enumerate(zip(slabs, owners)):
        res = mine.get(k)
        if dist.active:
            res = share_result(dist, res, owner, units[i], r1 - r0, device, with_pre)
        parts[i].append(res)
    return [join_rows(p) for p in parts]
