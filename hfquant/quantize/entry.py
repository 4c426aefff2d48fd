"""The one entry that quantizes a loaded float model according to an ``HFQuantConfig`` (calibration data
included): ``quantize_loaded_model_``. The public ``hfquant.quantize_`` and ``hfquant.quantize_layerwise`` go
through the transformers quantizer (``hfquant.integrations.transformers``), which calls it.

The config is only read: what the run resolves (the per-module schemes) comes back in ``Quantized`` and the
quantizer records it in its own copy of the config."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import AutoTokenizer

from hfquant.calibration import distributed
from hfquant.calibration.data import fingerprint, max_positions, windows_for
from hfquant.calibration.graph import is_quantizable, output_head_name
from hfquant.calibration.spill import ACTIVATIONS, make_store
from hfquant.core.errors import CalibrationError, ConfigError
from hfquant.core.gguf_blocks import BLOCK_TYPES, dequantize_rows, pack_rows
from hfquant.core.gguf_grids import rtn_block_quantize
from hfquant.mixed import gguf_types, resolve
from hfquant.quantize.w8a8 import quantize_w8a8_
from hfquant.quantize.weight_only import quantize_gptq_, quantize_rtn_, reports_as_dicts, WeightScheme

logger = logging.getLogger(__name__)


def _tokenizer_for(model, config):
    tok = config.tokenizer
    if tok is not None and not isinstance(tok, str):
        return tok

    source = tok or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise CalibrationError("hfquant: no tokenizer for calibration; pass HFQuantConfig(tokenizer=...)")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise CalibrationError(f"hfquant: cannot load a tokenizer from {source!r} ({type(exc).__name__}); pass HFQuantConfig(tokenizer=...)") from None


def _check_seq_len(model, seq_len: int) -> None:
    limit = max_positions(model.config)
    if limit is not None and seq_len > limit:
        raise CalibrationError(f"hfquant: seq_len={seq_len} exceeds the model's maximum of {limit} positions; lower seq_len")


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OOM_HINT = ("to use less memory: calibration.layerwise: true (quantize_layerwise), calibration.activations: cpu or "
            "disk, or a smaller calibration.batch_size; with --resume (single process, not layer-wise) a rerun starts "
            "after the last finished block")


class Quantized(NamedTuple):
    """What ``quantize_loaded_model_`` returns."""

    report: dict
    """Per-module results, calibration fingerprint, timings (``model.hfquant_report``)."""
    module_schemes: dict | None
    """The resolved ``{module: {bits, group_size, sym, method}}`` of every quantized module when the run used
    overrides, ``bits="auto"`` or given ``module_schemes`` (weight-only methods); ``None`` otherwise. The
    caller stores it as the saved config's ``module_schemes``, from which reload builds each module."""


def check_model_for_config(model, config, keep: Callable[[str], bool]) -> None:
    """What the architecture alone must allow for ``config`` (works on a meta-device skeleton, before any weight is
    read): with ``gguf_type`` every module to quantize is an ``nn.Linear`` (GGUF blocks are rows of a Linear weight;
    GPT-2's ``Conv1D`` stores its weight transposed). Raises ``ConfigError``."""
    if config.gguf_type is None:
        return
    for name, module in model.named_modules():
        if name and is_quantizable(module) and keep(name) and not isinstance(module, torch.nn.Linear):
            raise ConfigError(f"quantization.gguf_type: {name} is a {type(module).__name__}, not an nn.Linear; GGUF "
                              f"blocks hold Linear weights (Llama-family models), so quantize this model without "
                              "gguf_type")


def quantize_loaded_model_(model, config, keep: Callable[[str], bool], *args, **kwargs) -> Quantized:
    """Quantize ``model`` in place (``_quantize_loaded_model_``); a device out of memory becomes one line that
    names what to change. ``config`` is not modified."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    bad = sorted(str(d) for d in dtypes - set(SUPPORTED_DTYPES))
    if bad:
        raise ConfigError(f"hfquant: the model's weights are {', '.join(bad)}; quantization supports float32, bfloat16 "
                          "and float16 weights: load the model with dtype=torch.float32 (or bfloat16/float16)")
    try:
        return _quantize_loaded_model_(model, config, keep, *args, **kwargs)
    except torch.OutOfMemoryError as exc:
        where = (str(exc).splitlines() or [""])[0][:160]
        raise torch.OutOfMemoryError(f"the device ran out of memory while quantizing ({where}); {OOM_HINT}") from None


def _quantize_loaded_model_(model, config, keep: Callable[[str], bool], windows: torch.Tensor | None = None,
                            progress: bool = True, store=None, *, onload=None, activations: str = "device",
                            offload_folder=None, dist=None) -> Quantized:
    """Quantize ``model`` in place; returns the report (per-module results, calibration fingerprint, timings)
    and the resolved per-module schemes (``Quantized``).

    ``store`` (a ``hfquant.quantize.resume.ResumeStore``, GPTQ only) saves progress per block and resumes from it.
    ``onload`` (a ``hfquant.calibration.onload.LayerLoader``): the model is a meta skeleton whose blocks load one at a
    time. ``activations`` (``"device"``, ``"cpu"``, ``"disk"`` under ``offload_folder``) says where the
    calibration hidden states live between blocks. ``dist`` (``hfquant.calibration.distributed.Dist``,
    default: the initialised ``torch.distributed`` group, if any) splits the calibration batches across
    processes and reduces the statistics exactly.
    """
    dist = dist or distributed.current()
    if config.method == "smoothquant" and activations != "device":
        raise ConfigError(f"hfquant: activations={activations!r} is supported for gptq only; SmoothQuant keeps its "
                          "activations on the device (use activations: device)")
    if config.bits == "auto" and (onload is not None or dist.active):
        raise ConfigError("hfquant: bits: auto runs its sensitivity pass on the whole model in one process; "
                          "it cannot be combined with layerwise: true or several processes (use fixed bits there)")
    check_model_for_config(model, config, keep)
    head = _lm_head_to_quantize(model, config)  # checked before the run, not after a long calibration
    report: dict = {"method": config.method, "torch": torch.__version__, "machine": platform.machine()}
    schemes = None
    if resolve.is_mixed(config):
        schemes, skipped, conflicts = resolve.resolve_for_model(model, config, keep)
        report.update(skipped=skipped, override_conflicts=conflicts)
        keep = (lambda n, _keep=keep, _skip=frozenset(skipped): _keep(n) and n not in _skip)
    default = resolve.default_scheme(config)
    scheme = WeightScheme(default.bits, config.group_size if config.bits != "auto" else default.group_size,
                          config.sym, config.observer, default.gguf_type)
    model.eval()
    if config.method == "rtn":
        modules = reports_as_dicts(_rtn_layerwise(model, keep, scheme, onload, schemes) if onload is not None
                                   else quantize_rtn_(model, keep, scheme, schemes))
    else:
        _check_seq_len(model, config.seq_len)
        t0 = time.perf_counter()
        if windows is None:
            tokenizer = _tokenizer_for(model, config)
            windows = windows_for(config, tokenizer)
        report["calibration"] = {"fingerprint": fingerprint(windows), "shape": list(windows.shape),
                                 "seconds": time.perf_counter() - t0}
        batches = list(windows.split(config.calibration_batch_size))
        if dist.active:
            share = dist.batch_range(len(batches))
            report["calibration"]["processes"] = dist.world
            batches = batches[share.start:share.stop]
        if config.method == "smoothquant":
            modules = quantize_w8a8_(model, batches, keep, alpha=config.alpha, weight_method=config.weight_method,
                                     static_activations=config.activation_scheme == "static",
                                     damp_percent=config.damp_percent, block_size=config.block_size, progress=progress,
                                     dist=dist, onload=onload)
        else:
            if config.bits == "auto":
                t1 = time.perf_counter()
                schemes, report["auto"] = resolve.auto_schemes(model, config, keep, batches,
                                                             lambda: _tokenizer_for(model, config), progress)
                report["auto"]["seconds"] = time.perf_counter() - t1

            if activations not in ACTIVATIONS:
                raise ConfigError(f"hfquant: activations must be one of {list(ACTIVATIONS)}, got {activations!r}")
            device = onload.device if onload is not None else next(model.parameters()).device
            hidden = make_store(activations, device, offload_folder)
            gptq_timings: dict = {}
            t1 = time.perf_counter()
            try:
                modules = reports_as_dicts(quantize_gptq_(
                    model, batches, keep, scheme, act_order=config.desc_act, static_groups=config.static_groups,
                    damp_percent=config.damp_percent, block_size=config.block_size,
                    true_sequential=config.true_sequential, progress=progress, store=store, hidden=hidden,
                    dist=dist, onload=onload, cache_outputs=activations != "disk", schemes=schemes,
                    timings=gptq_timings, gptaq_alpha=config.gptaq_alpha if config.gptaq else None,
                    reconstruct_steps=config.reconstruct_steps, seed=config.seed))
            finally:
                hidden.close()
            # Solve time apart from the rest (forward passes, Hessians, their reduction, loading, swapping).
            solve_s = gptq_timings.get("solve_seconds", 0.0)
            report["gptq_seconds"] = {"solve": solve_s, "other": time.perf_counter() - t1 - solve_s}
    if store is not None:
        report["resumed_from_block"] = store.resumed_from
    report["modules"] = modules
    module_schemes = None
    if schemes is not None and config.method != "smoothquant":
        # The resolved scheme of every quantized module: reload builds each module from it.
        module_schemes = {m["name"]: {"bits": m["bits"], "group_size": m["group_size"],
                                      "sym": schemes[m["name"]].sym if m["name"] in schemes else config.sym,
                                      "method": m["method"]} for m in modules}
        for name, s in module_schemes.items():
            if name in schemes and schemes[name].gguf_type is not None:
                s["gguf_type"] = schemes[name].gguf_type
    if head is not None:
        modules += reports_as_dicts(_quantize_lm_head_(model, config, head))
    if config.gguf_type is not None:
        report["gguf"] = round_gguf_embeddings_(model, config)
    report["damp_retries"] = sum(m.get("damp_retries", 0) for m in modules)
    return Quantized(report, module_schemes)


def _lm_head_to_quantize(model, config) -> str | None:
    """The output head's name when ``lm_head_bits`` is set (``None`` otherwise); ``ConfigError`` when the model
    has no Linear head."""
    if config.lm_head_bits is None:
        return None

    name = output_head_name(model)
    if name is None or not is_quantizable(model.get_submodule(name)):
        raise ConfigError(f"hfquant: lm_head_bits={config.lm_head_bits} but {type(model).__name__} has no Linear "
                          "output head (get_output_embeddings()); set lm_head_bits: null")
    return name


def _quantize_lm_head_(model, config, name: str) -> list:
    """``lm_head_bits``: round the output head ``name`` to nearest, one scale and zero per output channel, after
    the rest of the model (its input is not calibrated: RTN needs none). A head tied to the input embeddings is
    untied first (``tie_word_embeddings`` is set false in the model's config, so reloads keep them apart);
    the embeddings keep the float tensor."""
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    model.all_tied_weights_keys = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()
                                   if not t.startswith(name + ".")}
    scheme = WeightScheme(config.lm_head_bits, -1, config.sym, config.observer)
    return quantize_rtn_(model, lambda n: n == name, scheme)


def round_gguf_embeddings_(model, config) -> dict:
    """With ``gguf_type``: round the output head and the token embeddings (in place, kept float) to the types the
    GGUF file stores them in (``gguf_types.embedding_modules``: llama.cpp's choice or the config's), so the model
    hfquant evaluates is the one llama.cpp runs. For a block type the blocks are kept in the module's
    ``HELD_BLOCKS`` buffer (saved with the model), and the GGUF writer copies them: rounding the rounded weight
    again is not the identity for Q4_K and Q6_K (their scales are searched), so only the kept blocks give the file
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


def _rtn_layerwise(model, keep, scheme, onload, schemes=None) -> list:
    """RTN a block at a time (loaded, quantized, its float Linears dropped), then the rest of the model."""
    reports = []
    for i in range(len(onload.blocks)):
        prefix = f"{onload.blocks_name}.{i}."
        onload.load_block(i)
        reports += quantize_rtn_(model, lambda n, _p=prefix: n.startswith(_p) and keep(n), scheme, schemes)
    onload.load_rest()
    return reports + quantize_rtn_(model, lambda n: not n.startswith(onload.blocks_name + ".") and keep(n), scheme,
                                   schemes)


