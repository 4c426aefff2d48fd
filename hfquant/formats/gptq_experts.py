"""Importing a GPTQ checkpoint's per-expert Linears (an MoE exported as its family's Hub checkpoints name them,
e.g. Mixtral ``block_sparse_moe.experts.<e>.w1``) into hfquant's fused quantized experts (``QuantExperts``).

Which per-expert Linear holds which rows of which expert's fused projection is what the export computes from
transformers' reverse conversion (``hfquant.formats.export_experts.expert_pieces``); the import reads the same map
backwards. Before the weights load, the experts module becomes an empty ``QuantExperts`` that remembers the map
(transformers does not know the per-expert GPTQ names and leaves its tensors to us); after the load
``fill_imported_experts_`` reads each piece's GPTQ tensors from the files, converts them to hfquant's packed codes
(``gptq_to_packed``: codes and zero points exactly, scales cast), puts each piece's rows in place and stacks the
experts.
"""

from __future__ import annotations

from safetensors import safe_open
import torch
from torch import nn

from hfquant.core.errors import FormatError
from hfquant.core.int_grid import IntGrid
from hfquant.formats.export_experts import expert_pieces, ExpertPiece
from hfquant.formats.gptq import gptq_to_packed, GPTQLayout
from hfquant.nn.experts import experts_layout, find_experts, quant_experts_skeleton, QuantExperts
from hfquant.nn.graph import set_submodule
from hfquant.nn.stored import skeleton


def expert_import_skeletons(model, keys: set[str], layout: GPTQLayout, dtype, files) -> set[str]:
    """Every experts module whose per-expert Linears all have a ``qweight`` in ``keys`` becomes an empty
    ``QuantExperts`` that remembers where its pieces are. Returns the per-expert module names it covers."""
    covered: set[str] = set()
    for name, module in find_experts(model).items():
        ex = experts_layout(module)
        if ex is None or ex.has_bias:
            continue
        try:
            pieces = expert_pieces(model, name, ex)
        except FormatError:  # a family whose checkpoints keep the experts fused: nothing per expert to import
            continue
        names = {p.name for ps in pieces.values() for p in ps}
        if not names or not all(f"{n}.qweight" in keys for n in names):
            continue
        templates = {p: skeleton(IntGrid(layout.bits, layout.group_size), *ex.dims(module, p), False, dtype)
                     for p in ex.projections}
        experts = quant_experts_skeleton(module, ex, templates)
        object.__setattr__(experts, "_gptq_import", (pieces, _file_of(files), layout))
        set_submodule(model, name, experts)
        covered |= names
    return covered


def _file_of(files) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    out = {}
    for f in files or []:
        if str(f).endswith(".safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), str(f)))
    return out


def _piece(files: dict[str, str], piece: ExpertPiece, layout: GPTQLayout):
    """One per-expert Linear's GPTQ tensors, read with one open per file, as hfquant's packed tensors."""
    keys = {k: f"{piece.name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")}
    t: dict[str, torch.Tensor | None] = dict.fromkeys(keys)
    for file in {files[key] for key in keys.values() if key in files}:
        with safe_open(file, "pt") as h:
            t.update({k: h.get_tensor(key) for k, key in keys.items() if files.get(key) == file})
    return gptq_to_packed(piece.name, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], layout.bits,
                          layout.group_size, layout.checkpoint_format)


def _projection(stack, pieces: list[ExpertPiece], files: dict[str, str], layout: GPTQLayout) -> None:
    """Fill one ``StackedExperts`` from its pieces."""
    out = {n: torch.zeros(p.shape, dtype=p.dtype, device="cpu") for n, p in stack.named_parameters(recurse=False)}
    seen: dict[int, torch.Tensor] = {}
    for piece in pieces:
        packed, scales, zeros, g_idx = _piece(files, piece, layout)
        e, rows = piece.expert, piece.rows
        out["weight"][e][rows] = packed
        out["scales"][e][rows] = scales.to(out["scales"].dtype)
        out["zeros"][e][rows] = zeros
        if e in seen and not torch.equal(seen[e], g_idx):
            raise FormatError(f"{piece.name}: its g_idx differs from another Linear of the same expert's fused "
                              "projection, which hfquant stores with one g_idx; load it with transformers' own GPTQ "
                              "integration instead")
        seen[e] = g_idx
        out["g_idx"][e] = g_idx
    for n, t in out.items():
        setattr(stack, n, nn.Parameter(t, requires_grad=False))


def fill_imported_experts_(model) -> None:
    """After the load: build the stacked tensors of every ``QuantExperts`` that ``expert_import_skeletons`` made."""
    for module in model.modules():
        job = getattr(module, "_gptq_import", None) if isinstance(module, QuantExperts) else None
        if job is None:
            continue
        pieces, files, layout = job
        for fused, ps in pieces.items():
            _projection(getattr(module, fused.rpartition(".")[2]), ps, files, layout)
        object.__setattr__(module, "_gptq_import", None)


def imported_experts(model) -> list[str]:
    """Names of the experts modules whose tensors come from per-expert GPTQ Linears (not loaded by name)."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantExperts) and getattr(m, "_gptq_import", None)]

