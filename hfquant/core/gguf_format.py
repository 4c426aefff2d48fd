"""``GGUFBlocks``: a weight stored as llama.cpp GGUF blocks of one type (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1, Q3_K, Q4_K,
Q5_K, Q6_K), and the grid policy GPTQ quantizes it on.

Stored tensors (``fields``): ``blocks`` uint8 ``[rows, cols / block_values * block_bytes]``, each row the type's
blocks exactly as a GGUF file stores them (``hfquant.core.gguf_blocks``). ``QuantLinearGGUF`` holds it. The run's
config selects it (``gguf_type``); each module's type follows llama.cpp's rules (``hfquant.core.gguf_types``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from hfquant.core import gguf_types
from hfquant.core.gguf_blocks import BLOCK_TYPES, block_type, dequantize_rows, pack_rows
from hfquant.core.gguf_grids import (
    BlockGrid,
    code_layout,
    concat_params,
    fit_block_grid,
    grid_codes,
    grid_values,
    rtn_block_quantize,
    symmetric,
)
from hfquant.core.int_grid import ColumnSegment, OriginalGroups
from hfquant.core.schemes import matches
from hfquant.core.weight_format import register_format, Scheme, WeightFormat

logger = logging.getLogger(__name__)


@register_format
@dataclass(frozen=True)
class GGUFBlocks(WeightFormat):
    """GGUF blocks of ``gguf_type`` (a block type of ``hfquant.core.gguf_blocks``)."""

    gguf_type: str = "Q4_K"

    kind = "gguf"
    fields = ("blocks",)
    keys = ("gguf_type",)
    exports = ("hfquant", "gguf")

    @property
    def bits(self) -> int:
        return BLOCK_TYPES[self.gguf_type].bits

    @property
    def group_size(self) -> int:
        return BLOCK_TYPES[self.gguf_type].group_size

    @property
    def sym(self) -> bool:
        return symmetric(self.gguf_type)

    @classmethod
    def check_field(cls, key: str, value: Any) -> str | None:
        return None if value in BLOCK_TYPES else f"one of {list(BLOCK_TYPES)}"

    @classmethod
    def from_fields(cls, fields: dict, observer: str = "minmax") -> GGUFBlocks | None:
        return cls(fields["gguf_type"]) if fields.get("gguf_type") else None

    @classmethod
    def from_config(cls, config) -> GGUFBlocks | None:
        return cls(gguf_types.base_type(config.gguf_type)) if config.gguf_type is not None else None

    def to_dict(self, method: str) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "method": method,
                "gguf_type": self.gguf_type}

    def describe(self) -> str:
        return f"GGUF {self.gguf_type} blocks"

    def columns_error(self, cols: int) -> str | None:
        bv = BLOCK_TYPES[self.gguf_type].block_values
        return None if cols % bv == 0 else f"GGUF {self.gguf_type}: {cols} input columns; expected a multiple of {bv}"

    def stored_bits(self, in_features: int, out_features: int, scale_bits: int = 32) -> int:
        bt = BLOCK_TYPES[self.gguf_type]
        return out_features * in_features // bt.block_values * bt.block_bytes * 8

    def rtn(self, w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        return (pack_rows(self.gguf_type, *rtn_block_quantize(self.gguf_type, w.float())),)

    def solver_grids(self, w: torch.Tensor, perm: torch.Tensor | None, static: bool, hinv: torch.Tensor,
                     scale_dtype: torch.dtype | None, h_diag: torch.Tensor | None = None):
        if perm is not None and not static:
            raise ValueError(f"GGUF {self.gguf_type}: act-order needs static_groups (a GGUF block holds consecutive "
                             "columns)")
        # Each column's weight in the scale search of the types that have one (llama.cpp's importance matrix idea):
        # the geometric mean of its mean square input H_jj (llama.cpp's statistic) and GPTQ's loss weight 1 / U_jj^2
        # (H_jj less what the later columns can compensate), processing order, then the original order. On SmolLM2
        # Q4_0 (PPL-16K): 1 / U_jj^2 alone 27.00, this mean 26.93 (experiments, BENCHMARKS "GGUF": ~0.1 is noise).
        importance = hinv.diagonal().pow(-2)
        if h_diag is not None:
            importance = (importance * h_diag).sqrt()
        if perm is not None:
            importance = importance[torch.argsort(perm)]
        return BlockTypeGrids(w, self.gguf_type, perm, static, importance)

    def dequantize(self, stored: tuple[torch.Tensor, ...], cols: int) -> torch.Tensor:
        return dequantize_rows(self.gguf_type, stored[0], cols)

    def empty(self, rows: int, cols: int, device) -> tuple[torch.Tensor, ...]:
        bt = block_type(self.gguf_type)
        return (torch.empty(rows, cols // bt.block_values * bt.block_bytes, dtype=torch.uint8, device=device),)

    def assign(self, config, cols: dict[str, int], schemes: dict[str, Scheme], skipped: list[str]):
        """The GGUF type of every module (``gguf_types.module_types``, then a ``gguf_type`` override wins, then the
        row-length fallback); modules no block type fits (rows not a multiple of 32) stay float, as llama.cpp keeps
        them F16."""
        mix = gguf_types.module_types(cols, config.gguf_type)
        given = {n for p, f in (config.overrides or {}).items() if "gguf_type" in f for n in cols if matches(p, n)}
        out = {}
        for name, s in schemes.items():
            own = s.format.gguf_type if isinstance(s.format, GGUFBlocks) else None
            t = gguf_types.fit_row(own if name in given else mix[name], cols[name])
            if t not in BLOCK_TYPES:
                logger.info("%s: %d input features fit no GGUF block type; kept float (F16 in the file)", name,
                            cols[name])
                skipped = [*skipped, name]
                continue
            out[name] = Scheme(GGUFBlocks(t), s.method)
        return out, skipped


    def module_error(self, name: str, module) -> str | None:
        if isinstance(module, torch.nn.Linear) or getattr(module, "linear_view", False):  # an MoE expert's projection
            return None
        return (f"quantization.gguf_type: {name} is a {type(module).__name__}, not an nn.Linear; GGUF blocks hold "
                "Linear weights (Llama-family models), so quantize this model without gguf_type")

    def finish_model_(self, model, config) -> dict:
        return round_gguf_embeddings_(model, config)

    def load_extras_(self, model, config, keys: set[str]) -> None:
        """Reloading: the output head's and token embeddings' GGUF blocks (``gguf_types.HELD_BLOCKS``, kept by
        ``round_gguf_embeddings_`` for the GGUF writer) get a buffer to load into, of the shape their type gives,
        where the checkpoint has them (checkpoints saved before hfquant kept them do not)."""
        for name, kind in gguf_types.embedding_modules(model, config).items():
            bt = BLOCK_TYPES.get(kind)
            if bt is None or f"{name}.{gguf_types.HELD_BLOCKS}" not in keys:
                continue
            module = model.get_submodule(name)
            rows, cols = module.weight.shape
            module.register_buffer(gguf_types.HELD_BLOCKS, torch.empty(
                rows, cols // bt.block_values * bt.block_bytes, dtype=torch.uint8, device="meta"))


def round_gguf_embeddings_(model, config) -> dict:
    """With ``gguf_type``: round the output head and the token embeddings (in place, kept float) to the types the
    GGUF file stores them in (``gguf_types.embedding_modules``: llama.cpp's choice or the config's), so the model
    hfquant evaluates is the one llama.cpp runs. For a block type the blocks are kept in the module's
    ``HELD_BLOCKS`` buffer (saved with the model), and the GGUF writer copies them: rounding the rounded weight
    again is not the identity for the k-quants (their scales are searched), so only the kept blocks give the file
    exactly the weight evaluated here. Returns ``{"head": type, "embeddings": type}``."""
    types = gguf_types.embedding_modules(model, config)
    for name, kind in types.items():
        module = model.get_submodule(name)
        w = module.weight
        with torch.no_grad():
            if kind in BLOCK_TYPES:
                blocks = pack_rows(kind, *rtn_block_quantize(kind, w.float()))
                w.copy_(dequantize_rows(kind, blocks, w.shape[1]).to(w.dtype))
                module.register_buffer(gguf_types.HELD_BLOCKS, blocks)
            elif kind in ("F16", "BF16"):
                w.copy_(w.to(torch.float16 if kind == "F16" else torch.bfloat16).to(w.dtype))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for role, module in (("head", head), ("embeddings", emb)):
        kind = types.get(names.get(id(module))) or types.get(names.get(id(emb)))  # tied: under the embeddings
        if getattr(module, "weight", None) is not None and kind is not None:
            out[role] = kind
    return out


class BlockTypeGrids(OriginalGroups):
    """A GGUF block type's grids (``hfquant.core.gguf_grids``): groups of the type's group size, whose stored
    parameters are fitted one span (a block, or a k-quant super-block) at a time: all up front on the original
    weight with ``static`` (act-order columns are quantized on their original group's grid), else when the span's
    first column comes up, on the weights as updated so far. ``stored`` packs the codes with the fitted parameters."""

    def __init__(self, w: torch.Tensor, name: str, perm: torch.Tensor | None, static: bool,
                 importance: torch.Tensor | None = None):
        self.bt = block_type(name)
        rows, cols = w.shape
        if cols % self.bt.block_values:
            raise ValueError(f"GGUF {name}: {cols} input columns; expected a multiple of {self.bt.block_values}")
        super().__init__(rows, cols, self.bt.group_size, w.device, None)
        self.name, self.span = name, self.bt.block_values
        self.offsets = torch.zeros_like(self.scales)
        self.spans: list[BlockGrid | None] = [None] * (cols // self.span)
        self._set_order(perm)
        self.static, self.importance = static, importance
        if static:
            for k in range(len(self.spans)):
                self._record(k, fit_block_grid(name, w[:, k * self.span:(k + 1) * self.span], self._importance(k)))

    def _importance(self, k: int) -> torch.Tensor | None:
        return None if self.importance is None else self.importance[k * self.span:(k + 1) * self.span]

    def _record(self, k: int, grid: BlockGrid) -> None:
        self.spans[k] = grid
        a, b = k * self.span // self.g, (k + 1) * self.span // self.g
        self.scales[:, a:b], self.offsets[:, a:b] = grid.scale, grid.offset
        self.zeros[:, a:b] = grid.zero

    def fits_at(self, j: int) -> bool:
        return not self.static and j % self.span == 0

    def _fit_if_due(self, j: int, block) -> None:
        if self.fits_at(j):
            self._record(j // self.span, fit_block_grid(self.name, block.updated_columns(j, j + self.span),
                                                        self._importance(j // self.span)))

    def segment(self, j1: int, j2: int, block) -> ColumnSegment:
        self._fit_if_due(j1, block)
        ks = torch.tensor([self.group_of(j) for j in range(j1, j2)], device=self.device)
        zero, lo, hi = code_layout(self.name)
        scale = self.scales[:, ks]
        return ColumnSegment(scale, torch.full_like(scale, float(zero)), self.offsets[:, ks], lo, hi)

    def column_grid(self, j: int, block):
        self._fit_if_due(j, block)
        k = self.group_of(j)
        scale, offset = self.scales[:, k], self.offsets[:, k]
        zero, lo, hi = code_layout(self.name)

        def quantize(col):
            q = grid_codes(col, scale, zero, offset, lo, hi)
            return q, grid_values(q, scale, zero, offset)
        return quantize

    def stored(self, codes: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (pack_rows(self.name, codes.int(), concat_params(self.spans)),)
