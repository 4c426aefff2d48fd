"""The tensor names of a GPTQ / compressed-tensors export: the ones transformers' own checkpoints of the family use.

A model with quantized experts saves its tensors under transformers' internal names
(``hfquant.integrations.transformers.keep_internal_names``): fused ``<experts>.gate_up_proj`` / ``down_proj``
projections, ``[experts, out, ...]``. Readers of GPTQ and compressed-tensors (vLLM's MoE loaders, transformers'
own loading) expect the names of the family's Hub checkpoints instead, one Linear per expert and projection
(e.g. Mixtral ``block_sparse_moe.experts.<e>.w1`` / ``w3`` / ``w2``; Qwen-MoE, OLMoE and DeepSeek
``mlp.experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``).

No table of families: the names come from transformers' reverse conversion (``revert_weight_conversion``, what
``save_pretrained`` runs for the float model), applied to probe tensors built from the model on the meta device:

* each fused projection gets an integer tensor whose output row ``o`` of expert ``e`` holds ``base + e * out + o``
  (one input column only, so a probe is small); after the reverse conversion every per-expert tensor it became
  says by its values which expert and which rows of the fused projection it holds (gate rows then up rows, or an
  interleaved layout's even / odd rows alike);
* every other tensor gets a meta tensor: the reverse conversion may rename it (e.g. Mixtral's router
  ``mlp.gate`` becomes ``block_sparse_moe.gate``) but must hand back the same object, or it would need a data
  conversion this export does not do (refused).

A checkpoint without quantized experts was saved with transformers' own names already and is kept as it is.
Refused (``FormatError``, one line): experts the reverse conversion keeps fused (gpt-oss: its checkpoints hold
the fused tensors, no per-expert Linear), experts with biases, W8A8 experts, and experts left float beside
quantized ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.core_model_loading import revert_weight_conversion

from hfquant.core.errors import FormatError
from hfquant.nn.experts import experts_layout, ExpertsLayout, find_experts

_KEEP = "keep save_format hfquant"


@dataclass(frozen=True)
class ExpertPiece:
    """One expert's projection as a Linear of the export: ``name`` (its exported module name) holds output rows
    ``rows`` of expert ``expert`` of the fused projection; ``scheme_key`` is its name in ``module_schemes``."""

    name: str
    expert: int
    rows: torch.Tensor
    scheme_key: str


@dataclass
class ExportNames:
    """Where each tensor of an hfquant checkpoint goes in the export. ``tensors``: every tensor that is not a
    quantized module's -> its exported key; ``modules``: quantized Linear -> exported module name; ``experts``:
    quantized fused projection (``<experts>.<proj>``) -> its per-expert Linears."""

    tensors: dict[str, str]
    modules: dict[str, str]
    experts: dict[str, list[ExpertPiece]] = field(default_factory=dict)

    def quantized(self) -> dict[str, str]:
        """Every quantized Linear of the export -> its name in ``module_schemes`` (the checkpoint's)."""
        out = {new: old for old, new in self.modules.items()}
        out.update({p.name: p.scheme_key for pieces in self.experts.values() for p in pieces})
        return out

    def rename_module(self, name: str) -> str:
        """The exported name of a float module of the checkpoint (by its ``weight``; unchanged if it has none)."""
        new = self.tensors.get(f"{name}.weight")
        return new[: -len(".weight")] if new and new.endswith(".weight") else name


def piece_tensors(tensors: dict[str, torch.Tensor], piece: ExpertPiece) -> dict[str, torch.Tensor]:
    """The hfquant tensors of one expert's Linear, cut out of its stacked projection's ``tensors``."""
    e, rows = piece.expert, piece.rows
    out = {k: tensors[k][e][rows] for k in ("weight", "scales", "zeros")}
    out["g_idx"] = tensors["g_idx"][e].clone()  # its own storage: gate and up share one g_idx row
    return out


def export_names(model, module_of: dict[str, str | None], modules: list[str], w8a8: bool) -> ExportNames:
    """The names for an export of a checkpoint with ``modules`` quantized. ``module_of``: every key of the checkpoint
    -> the quantized module it belongs to, or ``None``; ``model``: the architecture on the meta device."""
    layouts = {n: experts_layout(m) for n, m in find_experts(model).items()}
    fused = {m for m in modules if m.rpartition(".")[0] in layouts}
    others = [k for k in module_of if module_of[k] is None]
    if not fused:  # saved by transformers' own naming already
        return ExportNames({k: k for k in others}, {m: m for m in modules})
    if w8a8:
        raise FormatError(f"{sorted(fused)[0]}: W8A8 experts cannot be exported (the export writes weight-only "
                          f"experts); {_KEEP}")
    left_float = sorted(k for k in others if k.rpartition(".")[0] in layouts)
    if left_float:
        raise FormatError(f"{left_float[0]}: experts kept float beside quantized ones cannot be exported (one scheme "
                          "for every experts layer); quantize all experts modules, or " + _KEEP)
    experts: dict[str, list[ExpertPiece]] = {}
    for name in sorted({m.rpartition(".")[0] for m in fused}):
        if layouts[name] is None:
            raise FormatError(f"{name}: its fused experts have a layout the export does not know; {_KEEP}")
        experts.update(expert_pieces(model, name, layouts[name]))
        if layouts[name].has_bias:
            raise FormatError(f"{name}: experts with biases cannot be exported to per-expert GPTQ / compressed-tensors "
                              f"Linears here; {_KEEP}")
    dense = [m for m in modules if m not in fused]
    renamed = _renames(model, others + [f"{m}.weight" for m in dense])
    names = ExportNames({k: renamed[k] for k in others}, {m: _module(renamed[f"{m}.weight"], m) for m in dense}, experts)
    written = list(names.tensors.values()) + list(names.quantized())
    if len(set(written)) != len(written):
        raise FormatError("transformers' reverse conversion gives two tensors one name in this model; " + _KEEP)
    return names


def _module(key: str, old: str) -> str:
    if not key.endswith(".weight"):
        raise FormatError(f"{old}: transformers' reverse conversion names its weight {key!r}, not '<module>.weight'; {_KEEP}")
    return key[: -len(".weight")]


def _revert(model, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        return revert_weight_conversion(model, probe)
    except Exception as e:  # any failure of transformers' conversion code, reported in one line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise FormatError(f"transformers' reverse weight conversion failed on this model ({type(e).__name__}: {msg}); "
                          + _KEEP) from None


def _renames(model, keys: list[str]) -> dict[str, str]:
    """Key -> transformers' saved name, for tensors that the reverse conversion only renames."""
    probe = {k: torch.empty(0, device="meta") for k in keys}
    owner = {id(t): k for k, t in probe.items()}
    out: dict[str, str] = {}
    for new, t in _revert(model, probe).items():
        old = owner.get(id(t))
        if old is None:
            raise FormatError(f"{new}: transformers converts this tensor's data when saving (not a renaming), which "
                              f"the export does not do; {_KEEP}")
        out[old] = new
    missing = sorted(set(keys) - set(out))
    if missing:
        raise FormatError(f"{missing[0]}: transformers' reverse conversion drops or merges this tensor; {_KEEP}")
    return out


def expert_pieces(model, name: str, layout: ExpertsLayout) -> dict[str, list[ExpertPiece]]:
    """Per projection of experts module ``name``: where transformers' reverse conversion puts each expert's rows."""
    module = model.get_submodule(name)
    n, probe, ranges = layout.num_experts, {}, {}
    for proj in layout.projections:
        out_f = layout.dims(module, proj)[1]
        base = sum(n * o for _, o in ranges.values())
        ranges[proj] = (base, out_f)
        codes = torch.arange(base, base + n * out_f, dtype=torch.int64, device="cpu").reshape(n, out_f)
        probe[f"{name}.{proj}"] = codes[:, None, :] if layout.transposed else codes[:, :, None]
    pieces: dict[str, list[ExpertPiece]] = {f"{name}.{p}": [] for p in layout.projections}
    for key, t in _revert(model, probe).items():
        if t.dim() == 3:
            raise FormatError(f"{name}: transformers saves these experts fused, as {key!r} (the family's checkpoints "
                              "have no per-expert Linear), which GPTQ / compressed-tensors Linears cannot hold; " + _KEEP)
        if t.dim() != 2 or t.shape[1] != 1 or not key.endswith(".weight"):
            raise FormatError(f"{name}: transformers saves these experts as {key!r} {list(t.shape)}, not one [out, in] "
                              "Linear weight per expert, which this export needs; " + _KEEP)
        values = t[:, 0]
        proj = next((p for p, (b, o) in ranges.items() if b <= int(values[0]) < b + n * o), layout.projections[0])
        base, out_f = ranges[proj]
        local = values - base
        experts = set((local // out_f).tolist())
        if len(experts) != 1 or not bool(((local >= 0) & (local < n * out_f)).all()):
            raise FormatError(f"{key}: mixes rows of several experts or projections in transformers' saved layout; {_KEEP}")
        e = experts.pop()
        pieces[f"{name}.{proj}"].append(ExpertPiece(key[: -len(".weight")], e, local - e * out_f, f"{name}.{e}.{proj}"))
    for proj, (base, out_f) in ranges.items():
        got = [p.expert * out_f + p.rows for p in pieces[f"{name}.{proj}"]]
        if not got or not torch.equal(torch.cat(got).sort().values, torch.arange(n * out_f, device="cpu")):
            raise FormatError(f"{name}.{proj}: transformers' saved layout does not hold each expert row once; {_KEEP}")
    return pieces
