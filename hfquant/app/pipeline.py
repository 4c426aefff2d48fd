"""``hfquant run``: check every input, then load, evaluate, quantize (resumably), save, evaluate, push.

``plan`` (``hfquant.app.run_plan``) does all the checks that need no model weights (recipe, model config,
tokenizer, calibration and evaluation text, output folder, resume state) and writes nothing, so bad input fails in
seconds and leaves the disk untouched. ``execute`` does the work, in the output folder that
``hfquant.app.output.run_output`` holds (lock, resume store, partial folder); ``push`` (``hfquant.app.publish``)
uploads the result.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hfquant.api import quantize_, quantize_layerwise
from hfquant.app.output import run_output
from hfquant.app.publish import push
from hfquant.app.recipe import (  # noqa: F401 - RecipeError importable from here
    dump, EVALUATION_DEFAULTS, recipe_error, RecipeError, validate_evaluation,
)
from hfquant.app.report import (
    RECIPE, stored_average_bits, task_section, versions, write_card, write_report, write_sensitivity,
)
from hfquant.app.run_plan import eval_windows, evaluation_ids, load_kwargs, Plan, plan, run_device  # noqa: F401
from hfquant.calibration.data import max_positions  # noqa: F401 - evaluation_ids, max_positions: importable here
from hfquant.calibration.distributed import current
from hfquant.calibration.onload import checkpoint_files, local_folder
from hfquant.core.errors import HFQuantError
from hfquant.eval.perplexity import perplexity
from hfquant.eval.tasks import evaluate_tasks
from hfquant.formats.files import checkpoint_bytes, place, tensor_headers
from hfquant.kernels import cpu_ext

logger = logging.getLogger(__name__)


def build_kernels(device: str) -> float:
    """On the CPU, build (or load) hfquant's CPU kernels now, before any timed step: a first build takes tens of
    seconds, once per environment, and would otherwise land in whatever step loads the first quantized module.
    Returns the seconds spent building or waiting for another process's build (0.0 when it was loaded or is off)."""
    if device != "cpu":
        return 0.0
    before = cpu_ext.build_seconds()
    cpu_ext.extension()
    return cpu_ext.build_seconds() - before


def _checkpoint_float_bytes(recipe: dict) -> int:
    """Bytes of the float model as ``dtype`` (for the report), from the safetensors headers."""
    size = getattr(torch, recipe["dtype"]).itemsize
    files = sorted(set(checkpoint_files(local_folder(recipe["model"], recipe["revision"])).values()))
    total = sum(math.prod(shape) * size for _, shape, dtype in tensor_headers(files) if dtype.startswith(("F", "BF")))
    return total


def load_model(recipe: dict, dist=None):
    device = run_device(recipe["device"], dist)
    kwargs = dict(load_kwargs(recipe), dtype=getattr(torch, recipe["dtype"]), use_safetensors=True)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(recipe["model"], **kwargs).eval()
    except ValueError as exc:  # e.g. "Unrecognized configuration class" for a model that is not a causal LM
        raise recipe_error("model", exc) from None


def _perplexity(model, ids, ev, quiet: bool) -> float:
    return perplexity(model, None, ids, seq_len=ev["seq_len"], max_windows=eval_windows(ev, ids), progress=not quiet)


def eval_settings(saved: dict | None, **given) -> dict:
    """``hfquant eval``'s evaluation settings: the defaults, over them the saved recipe's (``saved``) ``evaluation``,
    over those the command line's ``given`` ones (``None``: not given); validated, ``before`` and ``after`` on (the
    checkpoint is evaluated whatever its run did)."""
    ev = {**EVALUATION_DEFAULTS, **((saved or {}).get("evaluation") or {})}
    ev.update({key: value for key, value in given.items() if value is not None})
    return validate_evaluation({**ev, "before": True, "after": True})


def run_tasks(model, tokenizer, ev: dict) -> dict | None:
    """lm-eval results of ``model`` on ``evaluation.tasks`` (``hfquant.eval.tasks``); ``None`` when none are named."""
    if not ev["tasks"]:
        return None
    return evaluate_tasks(model, tokenizer, ev["tasks"], limit=ev["task_limit"], num_fewshot=ev["num_fewshot"],
                          batch_size=ev["task_batch_size"])


def execute(p: Plan, quiet: bool = False) -> dict:
    """Run the plan; returns the report (also written to ``report.json``)."""
    timings: dict[str, float] = {"prepare": p.seconds}
    t_start = time.perf_counter()
    dist = current()
    if not dist.is_main:  # other calibration processes compute, wait, and write nothing
        report = _work(p, None, None, timings, t_start, True, dist)
        dist.barrier()  # on success only: a failing process exits and the launcher stops the others
        return report
    with run_output(p, dist) as (store, partial):
        report = _work(p, store, partial, timings, t_start, quiet, dist)
    logger.info("saved to %s", p.out)
    return report


def _work(p: Plan, store, partial: Path | None, timings: dict, t_start: float, quiet: bool, dist) -> dict:
    """The run's steps, in order: load, evaluate the float model, quantize, evaluate the quantized model, save,
    then the report (assembled in ``_report``), written with the model card into ``partial``, which is moved
    into place. A calibration process other than the main one stops after quantizing (returns its report)."""
    built = build_kernels(run_device(p.recipe["device"], dist))
    if built:
        timings["kernel_build"] = built
    model, source_bytes = _load(p, timings, dist)
    before = _evaluate_before(p, model, store, timings, quiet, dist)
    model, qreport = _quantize(p, model, store, timings, quiet, dist)
    if not dist.is_main:
        return qreport
    after = _evaluate_after(p, model, timings, quiet)
    _save(p, model, qreport, partial, timings)
    timings["total"] = time.perf_counter() - t_start
    report = _report(p, model.config.quantization_config, qreport, source_bytes, before, after, partial, timings)
    write_report(partial, report)
    write_card(partial, report, p.recipe, p.out.name)
    place(partial, p.out)
    return report


def _load(p: Plan, timings: dict, dist) -> tuple[object | None, int]:
    """The float model (``None`` with ``calibration.layerwise``: ``_quantize`` loads it a layer at a time) and its
    size in bytes as ``dtype``."""
    recipe, ev = p.recipe, p.recipe["evaluation"]
    if p.recipe["calibration"]["layerwise"]:
        if ev["before"] and dist.is_main:
            logger.info("calibration.layerwise: the float model is never loaded whole; skipping its evaluation")
        return None, _checkpoint_float_bytes(recipe)
    t0 = time.perf_counter()
    model = load_model(recipe, dist)
    timings["load"] = time.perf_counter() - t0
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
    return model, sum(t.numel() * t.element_size() for t in unique.values())


def _saved(store, key: str, ev: dict):
    """A value a resumed run saved with the same evaluation settings (``None`` when there is none)."""
    saved = store.get(key) if store is not None else None
    return saved["value"] if saved and saved["evaluation"] == ev else None


def _evaluate_before(p: Plan, model, store, timings: dict, quiet: bool, dist) -> dict:
    """``{"perplexity", "tasks"}`` of the float model (main process, whole model loaded), or those a resumed run saved
    with the same evaluation settings; ``None`` each when it is not measured. The tasks run after the perplexity."""
    ev = p.recipe["evaluation"]
    before = {"perplexity": _saved(store, "ppl_before", ev), "tasks": _saved(store, "tasks_before", ev)}
    if not (ev["before"] and model is not None and dist.is_main):
        return before
    if before["perplexity"] is None:
        logger.info("perplexity of the float model")
        t0 = time.perf_counter()
        before["perplexity"] = _perplexity(model, p.eval_ids, ev, quiet)
        timings["eval_before"] = time.perf_counter() - t0
        if store is not None:
            store.put("ppl_before", {"evaluation": ev, "value": before["perplexity"]})
    if ev["tasks"] and before["tasks"] is None:
        logger.info("lm-eval tasks of the float model: %s", ", ".join(ev["tasks"]))
        t0 = time.perf_counter()
        before["tasks"] = run_tasks(model, p.tokenizer, ev)
        timings["tasks_before"] = time.perf_counter() - t0
        if store is not None:
            store.put("tasks_before", {"evaluation": ev, "value": before["tasks"]})
    return before


def _quantize(p: Plan, model, store, timings: dict, quiet: bool, dist) -> tuple[object, dict]:
    """Quantize ``model`` in place (or, layer-wise, load and quantize it); returns the model and its report."""
    recipe, cal = p.recipe, p.recipe["calibration"]
    options = dict(windows=p.windows, progress=not quiet, activations=cal["activations"],
                   offload_folder=cal["offload_folder"], dist=dist)
    logger.info("quantizing: %s", p.config)
    t0 = time.perf_counter()
    if model is None:
        model = quantize_layerwise(recipe["model"], p.config, device=run_device(recipe["device"], dist),
                                   dtype=getattr(torch, recipe["dtype"]), revision=recipe["revision"],
                                   trust_remote_code=recipe["trust_remote_code"], **options)
        qreport = model.hfquant_report
    else:
        qreport = quantize_(model, p.config, store=store, **options)
    timings["quantize"] = time.perf_counter() - t0
    return model, qreport


def _evaluate_after(p: Plan, model, timings: dict, quiet: bool) -> dict:
    """``{"perplexity", "tasks"}`` of the quantized model, the tasks after the perplexity (``None`` each when
    ``evaluation.after`` is off; tasks ``None`` when none are named)."""
    ev = p.recipe["evaluation"]
    after = {"perplexity": None, "tasks": None}
    if not ev["after"]:
        return after
    logger.info("perplexity of the quantized model")
    t0 = time.perf_counter()
    after["perplexity"] = _perplexity(model, p.eval_ids, ev, quiet)
    timings["eval_after"] = time.perf_counter() - t0
    if ev["tasks"]:
        logger.info("lm-eval tasks of the quantized model: %s", ", ".join(ev["tasks"]))
        t0 = time.perf_counter()
        after["tasks"] = run_tasks(model, p.tokenizer, ev)
        timings["tasks_after"] = time.perf_counter() - t0
    return after


def _save(p: Plan, model, qreport: dict, partial: Path, timings: dict) -> None:
    """Write the model (its ``save_format``), the tokenizer, the resolved recipe and, for ``bits: auto``, the
    sensitivity files into ``partial``."""
    t0 = time.perf_counter()
    model.save_pretrained(partial)
    p.tokenizer.save_pretrained(partial)
    (partial / RECIPE).write_text(dump(p.recipe), encoding="utf-8")
    auto = qreport.get("auto")
    if auto:
        write_sensitivity(partial, auto["sensitivity"], auto["allocation"])
    timings["save"] = time.perf_counter() - t0


def _report(p: Plan, config, qreport: dict, source_bytes: int, before: dict, after: dict,
            partial: Path, timings: dict) -> dict:
    """``report.json``: the run's settings, the resolved quantization ``config`` (the saved model's, with its skip
    list and per-module schemes), perplexities, task results (``before``/``after``: ``_evaluate_before``'s dicts),
    sizes, timings and the quantization report."""
    recipe, ev = p.recipe, p.recipe["evaluation"]
    windows = eval_windows(ev, p.eval_ids) if p.eval_ids is not None else 0
    report = {
        "model_name": recipe["model"],
        "dtype": recipe["dtype"],
        "config": config.to_dict(),
        "evaluation": {"dataset": p.eval_name, "seq_len": ev["seq_len"], "windows": windows,
                       "tokens": windows * ev["seq_len"], "before": before["perplexity"],
                       "after": after["perplexity"]},
        "source_mib": round(source_bytes / 2**20, 1),
        "checkpoint_bytes": checkpoint_bytes(partial),
        "damp_retries": qreport.get("damp_retries", 0),
        "resumed_from_block": qreport.get("resumed_from_block", 0),
        "timings": timings,
        "versions": versions(),
        "quantization": {k: v for k, v in qreport.items() if k not in ("modules", "auto")},
        "layers": qreport.get("modules", []),
    }
    tasks = task_section(before["tasks"], after["tasks"])
    if tasks:
        report["tasks"] = tasks
    if config.module_schemes:
        report["stored_bits"] = stored_average_bits(partial)
    auto = qreport.get("auto")
    if auto:  # the table itself is sensitivity.json
        report["auto"] = {k: v for k, v in auto.items() if k != "sensitivity"}
    return report


__all__ = ["HFQuantError", "Plan", "execute", "plan", "push"]
# hfquant.app.cli's ``hfquant eval`` also reads evaluation_ids, eval_windows, max_positions and RecipeError from
# this module; the run's other checks are in hfquant.app.run_plan.
