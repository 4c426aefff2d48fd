"""Exact multi-process calibration: split the calibration batches across processes, reduce bit-exactly.

A single process accumulates every Hessian as ``H.addmm_(X_b^T, X_b)`` over batches ``b = 0..B-1`` in
order (``HessianStat``). Summing per-process partial Hessians (``all_reduce``) would add the same terms
in another order, and float addition is not associative, so the result would differ in the last bits.
Instead each process gets a contiguous range of whole batches and the running sum is passed along a chain:

- rank 0 accumulates its batches directly, as a single process does (it starts from zeros too);
- rank ``r > 0`` keeps the inputs ``X_b`` of its batches, receives the running ``H`` from rank ``r - 1``,
  applies the same ``addmm_`` for its batches in order, and sends it on;
- the last rank broadcasts the total.

So every process ends with exactly the single-process ``H`` (same operations, same operands, same order),
provided the GEMMs themselves give the same bits: same device type and the same number of intra-op threads
per process (``torch.set_num_threads``), since a GEMM's blocking can depend on it. Token counts are integers
and maxima are order-free, so those use ``all_reduce``. The forward passes (the expensive part) run in
parallel; only the ``addmm_`` chain is sequential. Every process then solves the same problem with the same
numbers, so the quantized weights agree without being sent around.

The process group is the one ``torch.distributed`` already has (``accelerate launch`` / ``PartialState``
create it; gloo on CPU, NCCL on GPUs). Nothing here imports accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.errors import CalibrationError


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

    def chain_addmm_(self, h: torch.Tensor, pending: list[torch.Tensor]) -> None:
        """Finish ``h`` (rank 0's running sum, or zeros elsewhere) with every rank's ``pending`` inputs, in
        rank order, exactly as one process would; afterwards every rank holds the total."""
        import torch.distributed as td

        if self.rank > 0:
            td.recv(h, src=self.rank - 1)
            for x in pending:
                h.addmm_(x.t(), x)
        if self.rank < self.world - 1:
            td.send(h, dst=self.rank + 1)
        td.broadcast(h, src=self.world - 1)

    def sum_int(self, n: int, device) -> int:
        import torch.distributed as td

        t = torch.tensor([n], dtype=torch.int64, device=device)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return int(t.item())

    def max(self, t: torch.Tensor, device) -> torch.Tensor:
        """Elementwise maximum of ``t`` over the processes (exact in any order), computed on ``device``."""
        import torch.distributed as td

        u = t.to(device).clone()
        td.all_reduce(u, op=td.ReduceOp.MAX)
        return u.to(t.device)

    def from_main(self, value: float, device) -> float:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.float64, device=device)
        td.broadcast(t, src=0)
        return float(t.item())

    def gather_lists(self, items: list) -> list:
        """Every rank's ``items``, concatenated in rank order (= batch order for contiguous batch ranges)."""
        import torch.distributed as td

        parts: list = [None] * self.world
        td.all_gather_object(parts, [t.cpu() for t in items])
        return [t for part in parts for t in part]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()


def current() -> Dist:
    """The ``Dist`` of the initialised ``torch.distributed`` group, or a single process when there is none."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        return Dist(td.get_rank(), td.get_world_size())
    return Dist()


def init_from_env() -> Dist:
    """Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE > 1``), create the process group through
    accelerate's ``PartialState`` (gloo on CPU-only machines, NCCL on GPUs); otherwise a single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return current()
