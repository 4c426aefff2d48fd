"""``hfquant run``: check every input, then load, evaluate, quantize (resumably), save, evaluate, push.

``plan`` does all the checks that need no model weights (recipe, model config, tokenizer, calibration and
evaluation text, output folder, resume state) and writes nothing, so bad input fails in seconds and leaves
the disk untouched. ``execute`` does the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hfquant.errors import HFQuantError
from hfquant.recipe import RecipeError
from hfquant.runner import max_positions

logger = logging.getLogger(__name__)
BUNDLED_EVAL_NAME = "WikiText-2 test (bundled)"


@dataclass
class Plan:
    recipe: dict
    config: object            # HFQuantConfig
    out: Path
    tokenizer: object
    windows: torch.Tensor | None
    eval_ids: torch.Tensor | None
    eval_name: str
    resume: bool
    push_repo: str | None
    key: str
    seconds: float = 0.0      # time spent checking inputs and preparing calibration/evaluation tokens


def _fail(path: str, exc: Exception | str) -> RecipeError:
    text = exc if isinstance(exc, str) else (str(exc).splitlines() or [type(exc).__name__])[0]
    return RecipeError(f"{path}: {text}")


def _load_kwargs(recipe: dict) -> dict:
    return {"revision": recipe["revision"], "trust_remote_code": recipe["trust_remote_code"]}


def model_config(recipe: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(recipe["model"], **_load_kwargs(recipe))
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for missing models
        raise _fail("model", f"cannot load the config of {recipe['model']!r} ({type(exc).__name__}); check the "
                             "Hub id or folder (offline: HF_HUB_OFFLINE=1 only finds cached models)") from None


def evaluation_ids(ev: dict, tokenizer) -> tuple[torch.Tensor, str]:
    """Token ids of the evaluation text (bundled WikiText-2 test by default) and a name for reports."""
    from hfquant.calibration.data import (
        BUNDLED_EVALUATION,
        join_texts,
        load_texts,
        tokenize_text,
    )
    from hfquant.errors import CalibrationError

    if ev["dataset"] is None:
        text, name = BUNDLED_EVALUATION.read_text(encoding="utf-8"), BUNDLED_EVAL_NAME
    else:
        try:
            text = join_texts(load_texts(ev["dataset"], config_name=ev["config"], split=ev["split"] or "test",
                                         column=ev["column"]))
        except CalibrationError as exc:
            raise _fail("evaluation.dataset", str(exc).replace("calibration dataset", "dataset")) from None
        name = ev["dataset"]
    ids = tokenize_text(text, tokenizer)
    if ids.numel() < ev["seq_len"]:
        raise _fail("evaluation.dataset", f"{name} has {ids.numel()} tokens, fewer than one window of "
                                          f"evaluation.seq_len={ev['seq_len']}; give more text or lower seq_len")
    return ids, name


def eval_windows(ev: dict, ids: torch.Tensor) -> int:
    n = ids.numel() // ev["seq_len"]
    return n if ev["max_tokens"] is None else min(n, ev["max_tokens"] // ev["seq_len"])


def plan(recipe: dict, *, overwrite: bool = False, resume: bool = False, push_repo: str | None = None) -> Plan:
    """Check everything that can be checked without loading weights; raise ``HFQuantError`` (bad input)."""
    from transformers import AutoTokenizer

    from hfquant.calibration.data import calibration_windows, fingerprint
    from hfquant.errors import CalibrationError
    from hfquant.output import check_output_dir, progress_dir
    from hfquant.recipe import check_repo_id, to_config

    t0 = time.perf_counter()
    config = to_config(recipe)
    if push_repo is not None:
        check_repo_id(push_repo, "--push-to-hub")
    out = Path(recipe["output_dir"]).expanduser()
    check_output_dir(out, overwrite)
    method = config.method
    if resume and method != "gptq":
        raise RecipeError(f"--resume: resuming is supported for quantization.method gptq only, not {method!r}; "
                          "rerun without --resume")
    if progress_dir(out).exists() and not resume and not overwrite:
        raise RecipeError(f"output_dir: an unfinished run was found in {str(progress_dir(out))!r}; pass --resume to "
                          "continue it or --overwrite to start over")

    _device(recipe["device"])
    cal = recipe["calibration"]
    from hfquant.calibration.distributed import current

    dist = current()
    if resume and (cal["layerwise"] or dist.active):
        raise RecipeError("--resume: resuming is not supported with calibration.layerwise or several processes; "
                          "rerun without --resume (or with --overwrite)")
    if cal["layerwise"]:
        from hfquant.onload import checkpoint_files
        from hfquant.recipe import looks_local

        if looks_local(recipe["model"]):
            try:
                checkpoint_files(Path(recipe["model"]).expanduser())
            except HFQuantError as exc:
                raise _fail("calibration.layerwise", str(exc).removeprefix("hfquant: ")) from None
    mcfg = model_config(recipe)
    limit = max_positions(mcfg)
    ev = recipe["evaluation"]
    for path, seq_len, used in (("calibration.seq_len", config.seq_len, method != "rtn"),
                                ("evaluation.seq_len", ev["seq_len"], ev["before"] or ev["after"])):
        if used and limit is not None and seq_len > limit:
            raise _fail(path, f"{seq_len} exceeds the model's maximum of {limit} positions; lower it")

    from hfquant.mixed import check_before_loading

    check_before_loading(config, mcfg, getattr(torch, recipe["dtype"]))
    source = recipe["calibration"]["tokenizer"] or recipe["model"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_load_kwargs(recipe))
    except Exception as exc:  # noqa: BLE001
        raise _fail("calibration.tokenizer", f"cannot load a tokenizer from {source!r} ({type(exc).__name__})") from None

    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars for local files are noise here
    windows = None
    if method != "rtn":
        try:
            windows = calibration_windows(tokenizer, dataset=config.dataset, config_name=config.dataset_config,
                                          split=config.dataset_split, column=config.dataset_column,
                                          num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed)
        except CalibrationError as exc:
            raise _fail("calibration", str(exc).removeprefix("calibration ")) from None
    eval_ids, eval_name = (None, "")
    if ev["before"] or ev["after"]:
        eval_ids, eval_name = evaluation_ids(ev, tokenizer)

    key_fields = {k: recipe[k] for k in ("model", "revision", "dtype", "device", "quantization", "calibration")}
    key_fields["windows"] = fingerprint(windows) if windows is not None else None
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return Plan(recipe, config, out, tokenizer, windows, eval_ids, eval_name, resume, push_repo, key,
                time.perf_counter() - t0)


def _device(name: str, dist=None) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} requested but CUDA is not available; use device: cpu")
    if name == "cuda" and dist is not None and dist.active:  # one GPU per process
        import os

        name = f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    return name


def _checkpoint_float_bytes(recipe: dict) -> int:
    """Bytes of the float model as ``dtype`` (for the report), from the safetensors headers."""
    import math

    from hfquant.onload import checkpoint_files, local_folder
    from hfquant.output import tensor_headers

    size = getattr(torch, recipe["dtype"]).itemsize
    files = sorted(set(checkpoint_files(local_folder(recipe["model"], recipe["revision"])).values()))
    total = sum(math.prod(shape) * size for _, shape, dtype in tensor_headers(files) if dtype.startswith(("F", "BF")))
    return total


def load_model(recipe: dict, dist=None):
    from transformers import AutoModelForCausalLM

    device = _device(recipe["device"], dist)
    kwargs = dict(_load_kwargs(recipe), dtype=getattr(torch, recipe["dtype"]), use_safetensors=True)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(recipe["model"], **kwargs).eval()
    except ValueError as exc:  # e.g. "Unrecognized configuration class" for a model that is not a causal LM
        raise _fail("model", exc) from None


def _perplexity(model, ids, ev, quiet: bool) -> float:
    from hfquant.eval.perplexity import perplexity

    return perplexity(model, None, ids, seq_len=ev["seq_len"], max_windows=eval_windows(ev, ids), progress=not quiet)


def execute(p: Plan, quiet: bool = False) -> dict:
    """Run the plan; returns the report (also written to ``report.json``)."""
    from hfquant.output import partial_dir, progress_dir
    from hfquant.progress import ProgressStore

    from hfquant.calibration.distributed import current

    timings: dict[str, float] = {"prepare": p.seconds}
    t_start = time.perf_counter()
    dist = current()
    if not dist.is_main:  # other calibration processes compute, wait, and write nothing
        report = _work(p, None, None, timings, t_start, True, dist)
        dist.barrier()  # on success only: a failing process exits and the launcher stops the others
        return report
    # progress is per process (hidden states of its own batches): no resume store with several processes
    resumable = p.config.method == "gptq" and not dist.active and not p.recipe["calibration"]["layerwise"]
    store = ProgressStore(progress_dir(p.out), p.key) if resumable else None
    partial = partial_dir(p.out)
    try:  # the first writes: fail here, before loading the model, when the output folder is not writable
        if store is not None:
            store.start(resume=p.resume)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    except OSError as exc:
        raise RecipeError(f"output_dir: cannot write next to {str(p.out)!r} ({exc.strerror}); choose another --output") from None
    if p.resume and store is not None and not store.resumed_from:
        logger.info("--resume: no finished blocks saved; starting from the first block")
    try:
        report = _work(p, store, partial, timings, t_start, quiet, dist)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if store is not None and store.blocks_done == 0:  # nothing worth resuming
            shutil.rmtree(store.folder, ignore_errors=True)
        raise
    dist.barrier()
    if store is not None:
        shutil.rmtree(store.folder, ignore_errors=True)
    logger.info("saved to %s", p.out)
    return report


def _work(p: Plan, store, partial: Path | None, timings: dict, t_start: float, quiet: bool, dist) -> dict:
    from hfquant.output import (
        RECIPE,
        checkpoint_bytes,
        place,
        versions,
        write_card,
        write_report,
    )
    from hfquant.recipe import dump
    from hfquant.runner import quantize_, quantize_layerwise

    recipe, ev, cal = p.recipe, p.recipe["evaluation"], p.recipe["calibration"]
    options = dict(windows=p.windows, progress=not quiet, activations=cal["activations"],
                   offload_folder=cal["offload_folder"], dist=dist)

    t0 = time.perf_counter()
    if cal["layerwise"]:
        model = None
        source_bytes = _checkpoint_float_bytes(recipe)
        if ev["before"] and dist.is_main:
            logger.info("calibration.layerwise: the float model is never loaded whole; skipping its perplexity")
    else:
        model = load_model(recipe, dist)
        timings["load"] = time.perf_counter() - t0
        unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
        source_bytes = sum(t.numel() * t.element_size() for t in unique.values())

    saved = store.get("ppl_before") if store is not None else None
    before = saved["value"] if saved and saved["evaluation"] == ev else None  # same evaluation settings only
    if ev["before"] and before is None and model is not None and dist.is_main:
        logger.info("perplexity of the float model")
        t0 = time.perf_counter()
        before = _perplexity(model, p.eval_ids, ev, quiet)
        timings["eval_before"] = time.perf_counter() - t0
        if store is not None:
            store.put("ppl_before", {"evaluation": ev, "value": before})

    logger.info("quantizing: %s", p.config)
    t0 = time.perf_counter()
    if model is None:
        model = quantize_layerwise(recipe["model"], p.config, device=_device(recipe["device"], dist),
                                   dtype=getattr(torch, recipe["dtype"]), revision=recipe["revision"],
                                   trust_remote_code=recipe["trust_remote_code"], **options)
        qreport = model.hfquant_report
    else:
        qreport = quantize_(model, p.config, store=store, **options)
    timings["quantize"] = time.perf_counter() - t0
    if not dist.is_main:
        return qreport

    after = None
    if ev["after"]:
        logger.info("perplexity of the quantized model")
        t0 = time.perf_counter()
        after = _perplexity(model, p.eval_ids, ev, quiet)
        timings["eval_after"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.save_pretrained(partial)
    p.tokenizer.save_pretrained(partial)
    (partial / RECIPE).write_text(dump(recipe), encoding="utf-8")
    auto = qreport.get("auto")
    if auto:
        from hfquant.mixed_output import write_sensitivity

        write_sensitivity(partial, auto["sensitivity"], auto["allocation"])
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    windows = eval_windows(ev, p.eval_ids) if p.eval_ids is not None else 0
    report = {
        "model_name": recipe["model"],
        "dtype": recipe["dtype"],
        "config": p.config.to_dict(),
        "evaluation": {"dataset": p.eval_name, "seq_len": ev["seq_len"], "windows": windows,
                       "tokens": windows * ev["seq_len"], "before": before, "after": after},
        "source_mib": round(source_bytes / 2**20, 1),
        "checkpoint_bytes": checkpoint_bytes(partial),
        "damp_retries": qreport.get("damp_retries", 0),
        "resumed_from_block": qreport.get("resumed_from_block", 0),
        "timings": timings,
        "versions": versions(),
        "quantization": {k: v for k, v in qreport.items() if k not in ("modules", "auto")},
        "layers": qreport.get("modules", []),
    }
    if p.config.module_schemes:
        from hfquant.mixed_output import stored_average_bits

        report["stored_bits"] = stored_average_bits(partial)
    if auto:  # the table itself is sensitivity.json
        report["auto"] = {k: v for k, v in auto.items() if k != "sensitivity"}
    write_report(partial, report)
    write_card(partial, report, recipe, p.out.name)
    place(partial, p.out)
    return report


def push(folder: Path, repo_id: str, hub: dict) -> str:
    from hfquant.hub import push_folder

    return push_folder(folder, repo_id, private=hub["private"], revision=hub["revision"],
                       commit_message=hub["commit_message"])


__all__ = ["HFQuantError", "Plan", "execute", "plan", "push"]
