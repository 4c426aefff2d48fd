"""Module skeletons a saved checkpoint loads into: before transformers reads the weights of an hfquant (or GPTQ)
checkpoint, each quantized module becomes an empty (meta) quantized module of the shape its tensors have."""

from __future__ import annotations

import torch

from hfquant.core.errors import ConfigError
from hfquant.core.int_grid import IntGrid
from hfquant.core.weight_format import format_from_config, format_from_fields
from hfquant.formats.gptq import checkpoint_keys, GPTQImportLinear, GPTQLayout
from hfquant.formats.gptq_experts import expert_import_skeletons, fill_imported_experts_
from hfquant.nn.experts import experts_layout, find_experts, quant_experts_skeleton
from hfquant.nn.graph import in_out_features, is_quantizable, output_head_name, set_submodule
from hfquant.nn.stored import skeleton
from hfquant.nn.w8a8 import QuantLinearW8A8


def hfquant_skeletons(model, cfg, keep, dtype, checkpoint_files) -> None:
    """An hfquant checkpoint: every module ``keep`` passes (and the 8-bit head of ``lm_head_bits``) becomes an empty
    module of the format its scheme (``module_schemes``, else the config's) stores (``hfquant.nn.stored.skeleton``),
    or a ``QuantLinearW8A8`` for SmoothQuant."""
    head = output_head_name(model) if cfg.lm_head_bits is not None else None
    _experts_skeletons(model, cfg, keep, dtype, checkpoint_files)
    for name, module in list(model.named_modules()):
        if not name or not is_quantizable(module) or not (keep(name) or name == head):
            continue
        in_f, out_f = in_out_features(module)
        bias = getattr(module, "bias", None) is not None
        if cfg.method == "smoothquant":
            with torch.device("meta"):
                q = QuantLinearW8A8(in_f, out_f, bias=bias, dtype=dtype)
        else:
            q = skeleton(_stored_format(cfg, name, head), in_f, out_f, bias, dtype)
        set_submodule(model, name, q)
    run_format = format_from_config(cfg)
    if run_format is not None:
        run_format.load_extras_(model, cfg, checkpoint_keys(checkpoint_files))


def _experts_skeletons(model, cfg, keep, dtype, checkpoint_files) -> None:
    """Each fused experts module the checkpoint holds quantized (``<experts>.<proj>.<tensor>`` keys) becomes an empty
    ``QuantExperts``: per projection, one expert's module skeleton (its scheme: expert 0's entry, all experts of a
    projection share one) stacked ``num_experts`` times, or the fused float tensor of a projection saved float."""
    experts = {n: m for n, m in find_experts(model).items() if experts_layout(m) is not None}
    if not experts:
        return
    keys = checkpoint_keys(checkpoint_files)
    for name, module in experts.items():
        layout = experts_layout(module)
        stacked = {p: keep(f"{name}.{p}") and any(k.startswith(f"{name}.{p}.") for k in keys) for p in layout.projections}
        if not any(stacked.values()):
            continue
        templates = {}
        for p in layout.projections:
            in_f, out_f = layout.dims(module, p)
            if not stacked[p]:  # saved float (its fused tensor)
                templates[p] = None
            elif cfg.method == "smoothquant":
                with torch.device("meta"):
                    templates[p] = QuantLinearW8A8(in_f, out_f, bias=layout.has_bias, dtype=dtype)
            else:
                templates[p] = skeleton(_stored_format(cfg, f"{name}.0.{p}", None), in_f, out_f, layout.has_bias, dtype)
        set_submodule(model, name, quant_experts_skeleton(module, layout, templates))


def _stored_format(cfg, name: str, head: str | None):
    """The weight format module ``name`` was saved in."""
    if name == head:  # saved with lm_head_bits: an 8-bit per-channel head, whatever the skip list says
        return IntGrid(cfg.lm_head_bits, -1)
    s = (cfg.module_schemes or {}).get(name) or {"bits": cfg.bits, "group_size": cfg.group_size}
    if s["bits"] == "auto":
        raise ConfigError(f"hfquant: {name} has no entry in quantization_config.module_schemes of this "
                          "bits='auto' checkpoint; the config.json is incomplete, re-save the model")
    return format_from_fields(s)


def gptq_skeletons(model, cfg, dtype, checkpoint_files) -> None:
    """Importing a GPTQ checkpoint: give each module that has a ``qweight`` in the files a skeleton
    holding the GPTQ tensors; ``convert_gptq_skeletons`` converts them once they are loaded."""
    keys = checkpoint_keys(checkpoint_files)
    names = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
    if not names:
        raise ConfigError(f"hfquant: checkpoint_format={cfg.checkpoint_format!r} but no '*.qweight' tensor in the "
                          "checkpoint's safetensors files; is it a GPTQ checkpoint (safetensors only)?")
    tied = {k.rsplit(".", 1)[0] for k in getattr(model, "all_tied_weights_keys", {}) or {}}
    layout = GPTQLayout(cfg.bits, cfg.group_size, cfg.checkpoint_format)
    experts = expert_import_skeletons(model, keys, layout, dtype, checkpoint_files)  # an MoE's per-expert Linears
    for name in (n for n in names if n not in experts):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"hfquant: checkpoint has {name}.qweight but the model has no module {name!r}") from None
        if not is_quantizable(module) or name in tied:
            raise ConfigError(f"hfquant: {name} is quantized in the GPTQ checkpoint but is not an untied Linear here")
        in_f, out_f = in_out_features(module)
        with torch.device("meta"):
            q = GPTQImportLinear(in_f, out_f, layout, f"{name}.g_idx" in keys, f"{name}.bias" in keys, dtype, name=name)
        set_submodule(model, name, q)


def convert_gptq_skeletons(model) -> None:
    """Replace the GPTQ skeletons by ``QuantLinearWeightOnly`` modules; fill the imported experts modules."""
    fill_imported_experts_(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, GPTQImportLinear):
            set_submodule(model, name, module.to_w4a16())
