"""Quantize a loaded float model according to an ``HFQuantConfig`` (calibration data included)."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable

import torch

from hfquant.errors import CalibrationError
from hfquant.quantize import WeightScheme, quantize_gptq_, quantize_rtn_, reports_as_dicts

logger = logging.getLogger(__name__)


def _tokenizer_for(model, config):
    tok = config.tokenizer
    if tok is not None and not isinstance(tok, str):
        return tok
    from transformers import AutoTokenizer

    source = tok or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise CalibrationError("hfquant: no tokenizer for calibration; pass HFQuantConfig(tokenizer=...)")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise CalibrationError(f"hfquant: cannot load a tokenizer from {source!r} ({type(exc).__name__}); pass HFQuantConfig(tokenizer=...)") from None


def max_positions(config) -> int | None:
    """The longest sequence a model config allows (``None`` when it does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_seq_len(model, seq_len: int) -> None:
    limit = max_positions(model.config)
    if limit is not None and seq_len > limit:
        raise CalibrationError(f"hfquant: seq_len={seq_len} exceeds the model's maximum of {limit} positions; lower seq_len")


def quantize_loaded_model_(model, config, keep: Callable[[str], bool], windows: torch.Tensor | None = None,
                           progress: bool = True, store=None) -> dict:
    """Quantize ``model`` in place; returns a report (per-module results, calibration fingerprint, timings).

    ``store`` (a ``hfquant.progress.ProgressStore``, GPTQ only) saves progress per block and resumes from it.
    """
    from hfquant.calibration.data import calibration_windows, fingerprint

    from hfquant import mixed

    report: dict = {"method": config.method, "torch": torch.__version__, "machine": platform.machine()}
    schemes = None
    if mixed.is_mixed(config):
        schemes, skipped, conflicts = mixed.resolve_for_model(model, config, keep)
        report.update(skipped=skipped, override_conflicts=conflicts)
        keep = (lambda n, _keep=keep, _skip=frozenset(skipped): _keep(n) and n not in _skip)
    default = mixed.default_scheme(config)
    scheme = WeightScheme(default.bits, config.group_size if config.bits != "auto" else default.group_size,
                          config.sym, config.observer)
    model.eval()
    if config.method == "rtn":
        modules = reports_as_dicts(quantize_rtn_(model, keep, scheme, schemes))
    else:
        _check_seq_len(model, config.seq_len)
        t0 = time.perf_counter()
        if windows is None:
            tokenizer = _tokenizer_for(model, config)
            windows = calibration_windows(tokenizer, dataset=config.dataset, config_name=config.dataset_config,
                                          split=config.dataset_split, column=config.dataset_column,
                                          num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed)
        report["calibration"] = {"fingerprint": fingerprint(windows), "shape": list(windows.shape),
                                 "seconds": time.perf_counter() - t0}
        batches = list(windows.split(config.calibration_batch_size))
        if config.method == "smoothquant":
            from hfquant.quantize_w8a8 import quantize_w8a8_

            modules = quantize_w8a8_(model, batches, keep, alpha=config.alpha, weight_method=config.weight_method,
                                     static_activations=config.activation_scheme == "static",
                                     damp_percent=config.damp_percent, block_size=config.block_size, progress=progress)
        else:
            if config.bits == "auto":
                t1 = time.perf_counter()
                schemes, report["auto"] = mixed.auto_schemes(model, config, keep, batches,
                                                             lambda: _tokenizer_for(model, config), progress)
                report["auto"]["seconds"] = time.perf_counter() - t1
            modules = reports_as_dicts(quantize_gptq_(
                model, batches, keep, scheme, act_order=config.desc_act, static_groups=config.static_groups,
                damp_percent=config.damp_percent, block_size=config.block_size,
                true_sequential=config.true_sequential, progress=progress, store=store, schemes=schemes))
    if store is not None:
        report["resumed_from_block"] = store.resumed_from
    report["modules"] = modules
    if schemes is not None and config.method != "smoothquant":
        # The resolved scheme of every quantized module: reload builds each module from it.
        config.module_schemes = {m["name"]: {"bits": m["bits"], "group_size": m["group_size"],
                                             "sym": schemes[m["name"]].sym if m["name"] in schemes else config.sym,
                                             "method": m["method"]} for m in modules}
    report["damp_retries"] = sum(m.get("damp_retries", 0) for m in modules)
    return report


def quantize_in_place_(model, config, **options) -> dict:
    """Quantize an already loaded float transformers model in place, exactly as
    ``from_pretrained(..., quantization_config=config)`` would (same skip list, config and report), so it
    saves and reloads like one. ``options`` go to ``quantize_loaded_model_`` (``windows``, ``progress``,
    ``store``). Returns ``model.hfquant_report``.
    """
    from hfquant.integrations.transformers import HFQuantHfQuantizer

    quantizer = HFQuantHfQuantizer(config, pre_quantized=False)
    quantizer.run_options = options
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model.hfquant_report
