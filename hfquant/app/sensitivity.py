"""``hfquant sensitivity``: the per-module sensitivity table of a float model, written as an output folder."""

from __future__ import annotations

import shutil
import time

from huggingface_hub import ModelCard, ModelCardData

from hfquant.app.pipeline import load_model
from hfquant.app.report import CARD, measure_words, SENSITIVITY_JSON, SENSITIVITY_MD, SENSITIVITY_PNG, write_sensitivity
from hfquant.core.errors import ConfigError
from hfquant.formats.files import OutputLock, partial_dir, place
from hfquant.integrations.transformers import modules_left_float, quantized_predicate
from hfquant.mixed.sensitivity import has_fisher, measure_for_config


def run_sensitivity(plan, quiet: bool = False) -> dict:
    """``hfquant sensitivity``: measure the table on the float model and write it (JSON, markdown, PNG) with a
    ``README.md`` into the plan's output folder (assembled beside it, moved into place when complete)."""
    cfg = plan.config
    if plan.windows is None:
        raise ConfigError("quantization.method: sensitivity needs calibration data; use method gptq in the recipe")
    t0 = time.perf_counter()
    model = load_model(plan.recipe)
    keep = quantized_predicate(modules_left_float(model, cfg.modules_to_not_convert))
    table = measure_for_config(model, list(plan.windows.split(cfg.calibration_batch_size)), keep, cfg, not quiet)
    table["model"] = plan.recipe["model"]
    partial = partial_dir(plan.out)
    lock = OutputLock(plan.out)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        write_sensitivity(partial, table)
        data = ModelCardData(library_name="transformers", tags=["hfquant", "sensitivity"])
        body = (f"\n# Sensitivity of {plan.recipe['model']}\n\n"
                f"Measured by `hfquant sensitivity` in {table['seconds']:.0f} s on {plan.windows.shape[0]} calibration "
                f"windows x {plan.windows.shape[1]} tokens: for every quantizable module and candidate scheme, the GPTQ "
                "and RTN proxy loss tr((W-Q) H (W-Q)^T) when only that module is quantized, relative to tr(W H W^T)"
                + (f", and the estimated increase of the next-token loss (output errors weighted by squared loss gradients "
                   f"from {table['fisher_windows']} windows)" if has_fisher(table) else "")
                + f". The plot shows {measure_words(table)}.\n\n"
                f"![per-module sensitivity]({SENSITIVITY_PNG})\n\n"
                f"Table: `{SENSITIVITY_MD}`; data: `{SENSITIVITY_JSON}`.\n")
        ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(str(partial / CARD))
        place(partial, plan.out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        lock.release()
    table["total_seconds"] = time.perf_counter() - t0
    return table
