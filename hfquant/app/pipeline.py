"""``hfquant run``: check every input, then load, evaluate, quantize (resumably), save, evaluate, push.

``plan`` does all the checks that need no model weights (recipe, model config, tokenizer, calibration and
evaluation text, output folder, resume state) and writes nothing, so bad input fails in seconds and leaves
the disk untouched. ``execute`` does the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants, ModelCard, ModelCardData
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import yaml

from hfquant.app.hub import push_folder
from hfquant.app.recipe import check_repo_id, dump, looks_local, recipe_error, RecipeError, safe_load, to_config
from hfquant.app.report import (
    CARD,
    measure_words,
    RECIPE,
    REPORT,
    SENSITIVITY_JSON,
    SENSITIVITY_MD,
    SENSITIVITY_PNG,
    stored_average_bits,
    versions,
    write_card,
    write_report,
    write_sensitivity,
)
from hfquant.calibration.data import (
    BUNDLED_EVALUATION,
    evaluation_token_ids,
    fingerprint,
    join_texts,
    load_texts,
    max_positions,
    windows_for,
)
from hfquant.calibration.distributed import current
from hfquant.calibration.graph import find_blocks, in_out_features, quantizable_modules
from hfquant.calibration.onload import checkpoint_files, local_folder
from hfquant.config import DEFAULT_CANDIDATES
from hfquant.core.errors import CalibrationError, ConfigError, HFQuantError
from hfquant.core.schemes import resolve
from hfquant.eval.perplexity import perplexity
from hfquant.formats.files import (
    check_output_dir,
    check_output_location,
    checkpoint_bytes,
    CheckpointError,
    describe_fingerprint_change,
    OutputLock,
    partial_dir,
    place,
    progress_dir,
    tensor_headers,
    weights_fingerprint,
)
from hfquant.integrations.transformers import modules_left_float, quantize_, quantize_layerwise, quantized_predicate
from hfquant.integrations.validate import validate_checkpoint
from hfquant.kernels import cpu_ext
from hfquant.mixed.budget import average_range
from hfquant.mixed.resolve import default_scheme
from hfquant.mixed.sensitivity import has_fisher, measure_for_config
from hfquant.quantize.entry import check_model_for_config
from hfquant.quantize.resume import ResumeStore

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
    key_parts: dict           # what identifies the run for --resume (resume_parts)
    seconds: float = 0.0      # time spent checking inputs and preparing calibration/evaluation tokens

    @property
    def key(self) -> str:
        """The run's resume key: a hash of ``key_parts``."""
        return hashlib.sha256(json.dumps(self.key_parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load_kwargs(recipe: dict) -> dict:
    return {"revision": recipe["revision"], "trust_remote_code": recipe["trust_remote_code"]}


def model_config(recipe: dict):
    try:
        return AutoConfig.from_pretrained(recipe["model"], **_load_kwargs(recipe))
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for missing models
        raise recipe_error("model", f"cannot load the config of {recipe['model']!r} ({type(exc).__name__}); check the "
                                    "Hub id or folder (offline: HF_HUB_OFFLINE=1 only finds cached models)") from None


def evaluation_ids(ev: dict, tokenizer) -> tuple[torch.Tensor, str]:
    """Token ids of the evaluation text (bundled WikiText-2 test by default) and a name for reports."""
    if ev["dataset"] is None:
        text, name = BUNDLED_EVALUATION.read_text(encoding="utf-8"), BUNDLED_EVAL_NAME
    else:
        try:
            text = join_texts(load_texts(ev["dataset"], config_name=ev["config"], split=ev["split"] or "test",
                                         column=ev["column"]))
        except CalibrationError as exc:
            raise recipe_error("evaluation.dataset", str(exc).replace("calibration dataset", "dataset")) from None
        name = ev["dataset"]
    ids = evaluation_token_ids(text, tokenizer, ev["seq_len"])
    if ids.numel() < ev["seq_len"]:
        raise recipe_error("evaluation.dataset", f"{name} has {ids.numel()} tokens, fewer than one window of "
                                                 f"evaluation.seq_len={ev['seq_len']}; give more text or lower seq_len")
    return ids, name


def eval_windows(ev: dict, ids: torch.Tensor) -> int:
    n = ids.numel() // ev["seq_len"]
    return n if ev["max_tokens"] is None else min(n, ev["max_tokens"] // ev["seq_len"])


def input_paths(recipe: dict, recipe_file=None) -> dict[str, Path]:
    """The local paths a run reads (description -> path), which its output must never replace: the model folder (or,
    for a Hub id, the Hub cache), a local tokenizer, the calibration and evaluation files and the recipe itself."""
    paths: dict[str, Path] = {}
    model = recipe["model"]
    paths["the input model"] = Path(model) if looks_local(model) else Path(hub_constants.HF_HUB_CACHE)
    for what, value in (("the tokenizer", recipe["calibration"]["tokenizer"]),
                        ("the calibration dataset", recipe["calibration"]["dataset"]),
                        ("the evaluation dataset", recipe["evaluation"]["dataset"])):
        if isinstance(value, str) and Path(value).expanduser().exists():
            paths[what] = Path(value)
    if recipe_file is not None:
        paths["the recipe"] = Path(recipe_file)
    return paths


def check_output(recipe: dict, out: Path, overwrite: bool, recipe_file=None, writer: bool = True) -> None:
    """The output folder can be written without harm: not the current or home directory, not an input or around
    one (``check_output_location``), creatable or replaceable (``check_output_dir``), and -- for the process that
    will write it (``writer``; with several calibration processes, the main one: the lock may already be its) -- no
    other run writing it now (``OutputLock``)."""
    check_output_location(out, input_paths(recipe, recipe_file))
    check_output_dir(out, overwrite)
    if writer:
        OutputLock(out).refuse_if_held()


def plan(recipe: dict, *, overwrite: bool = False, resume: bool = False, push_repo: str | None = None,
         recipe_file=None) -> Plan:
    """Check everything that can be checked without loading weights; raise ``HFQuantError`` (bad input).
    ``recipe_file``: the recipe's path, which the output must not replace."""
    t0 = time.perf_counter()
    config = to_config(recipe)
    if push_repo is not None:
        check_repo_id(push_repo, "--push-to-hub")
    out = Path(recipe["output_dir"]).expanduser()
    dist = current()
    check_output(recipe, out, overwrite, recipe_file, writer=dist.is_main)
    method = config.method
    if resume and method != "gptq":
        raise RecipeError(f"--resume: resuming is supported for quantization.method gptq only, not {method!r}; "
                          "rerun without --resume")
    if progress_dir(out).exists() and not resume and not overwrite:
        raise RecipeError(f"output_dir: an unfinished run was found in {str(progress_dir(out))!r}; pass --resume to "
                          "continue it or --overwrite to start over")

    _device(recipe["device"])
    cal = recipe["calibration"]

    if resume and (cal["layerwise"] or dist.active):
        raise RecipeError("--resume: resuming is not supported with calibration.layerwise or several processes; "
                          "rerun without --resume (or with --overwrite)")
    if cal["layerwise"]:
        if looks_local(recipe["model"]):
            try:
                checkpoint_files(Path(recipe["model"]).expanduser())
            except HFQuantError as exc:
                raise recipe_error("calibration.layerwise", str(exc).removeprefix("hfquant: ")) from None
    mcfg = model_config(recipe)
    if looks_local(recipe["model"]):  # its config against its tensors: a missing tensor would load as random weights
        try:
            validate_checkpoint(Path(recipe["model"]).expanduser())
        except CheckpointError as exc:
            raise recipe_error("model", str(exc)) from None
    quantized = getattr(mcfg, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "?")
        raise recipe_error("model", f"{recipe['model']!r} is already quantized (its config.json has a "
                                    f"quantization_config, quant_method {method!r}); give the float model it was made from")
    limit = max_positions(mcfg)
    ev = recipe["evaluation"]
    for path, seq_len, used in (("calibration.seq_len", config.seq_len, method != "rtn"),
                                ("evaluation.seq_len", ev["seq_len"], ev["before"] or ev["after"])):
        if used and limit is not None and seq_len > limit:
            raise recipe_error(path, f"{seq_len} exceeds the model's maximum of {limit} positions; lower it")

    check_before_loading(config, mcfg, getattr(torch, recipe["dtype"]))
    source = recipe["calibration"]["tokenizer"] or recipe["model"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_load_kwargs(recipe))
    except Exception as exc:  # noqa: BLE001
        raise recipe_error("calibration.tokenizer", f"cannot load a tokenizer from {source!r} ({type(exc).__name__})") from None

    import datasets  # heavy (pyarrow, pandas): imported only when calibration text is read

    datasets.disable_progress_bars()  # "Generating train split" bars for local files are noise here
    windows = None
    if method != "rtn":
        try:
            windows = windows_for(config, tokenizer)
        except CalibrationError as exc:
            raise recipe_error("calibration", str(exc).removeprefix("calibration ")) from None
    eval_ids, eval_name = (None, "")
    if ev["before"] or ev["after"]:
        eval_ids, eval_name = evaluation_ids(ev, tokenizer)

    return Plan(recipe, config, out, tokenizer, windows, eval_ids, eval_name, resume, push_repo,
                resume_parts(recipe, mcfg, windows),
                time.perf_counter() - t0)


def resume_parts(recipe: dict, model_config, windows) -> dict:
    """What a resumable run is made of (``ResumeStore`` parts): the model's weights -- a local folder's
    ``weights_fingerprint`` (content, not path), or a Hub model's commit --, the recipe's settings, and the
    calibration windows' hash."""
    if looks_local(recipe["model"]):
        weights = weights_fingerprint(Path(recipe["model"]).expanduser())
    else:
        commit = getattr(model_config, "_commit_hash", None)
        weights = {"hub commit": commit} if commit else {"hub id": recipe["model"], "revision": recipe["revision"]}
    settings = {k: recipe[k] for k in ("dtype", "device", "quantization", "calibration")}
    return {"model weights": weights,
            "recipe": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24],
            "calibration data": fingerprint(windows) if windows is not None else None}


def describe_change(name: str, old, new) -> str:
    """``ResumeStore``'s words for a changed part: which weight files differ."""
    if name == "model weights" and isinstance(old, dict) and isinstance(new, dict):
        return describe_fingerprint_change(old, new)
    return ""


def _device(name: str, dist=None) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} requested but CUDA is not available; use device: cpu")
    if name == "cuda" and dist is not None and dist.active:  # one GPU per process
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    return name


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
    device = _device(recipe["device"], dist)
    kwargs = dict(_load_kwargs(recipe), dtype=getattr(torch, recipe["dtype"]), use_safetensors=True)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(recipe["model"], **kwargs).eval()
    except ValueError as exc:  # e.g. "Unrecognized configuration class" for a model that is not a causal LM
        raise recipe_error("model", exc) from None


def _perplexity(model, ids, ev, quiet: bool) -> float:
    return perplexity(model, None, ids, seq_len=ev["seq_len"], max_windows=eval_windows(ev, ids), progress=not quiet)


def execute(p: Plan, quiet: bool = False) -> dict:
    """Run the plan; returns the report (also written to ``report.json``)."""
    timings: dict[str, float] = {"prepare": p.seconds}
    t_start = time.perf_counter()
    dist = current()
    if not dist.is_main:  # other calibration processes compute, wait, and write nothing
        report = _work(p, None, None, timings, t_start, True, dist)
        dist.barrier()  # on success only: a failing process exits and the launcher stops the others
        return report
    # progress is per process (hidden states of its own batches): no resume store with several processes
    resumable = p.config.method == "gptq" and not dist.active and not p.recipe["calibration"]["layerwise"]
    store = ResumeStore(progress_dir(p.out), p.key, p.key_parts, describe_change) if resumable else None
    partial = partial_dir(p.out)
    lock = OutputLock(p.out)
    try:  # the first writes: fail here, before loading the model, when the output folder is not writable
        p.out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:
        raise RecipeError(f"output_dir: cannot write next to {str(p.out)!r} ({exc.strerror}); choose another --output") from None
    try:
        try:
            if store is not None:
                store.start(resume=p.resume)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as exc:
            raise RecipeError(f"output_dir: cannot write next to {str(p.out)!r} ({exc.strerror}); choose another "
                              "--output") from None
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
    finally:
        lock.release()
    logger.info("saved to %s", p.out)
    return report


def _work(p: Plan, store, partial: Path | None, timings: dict, t_start: float, quiet: bool, dist) -> dict:
    """The run's steps, in order: load, evaluate the float model, quantize, evaluate the quantized model, save,
    then the report (assembled in ``_report``), written with the model card into ``partial``, which is moved
    into place. A calibration process other than the main one stops after quantizing (returns its report)."""
    built = build_kernels(_device(p.recipe["device"], dist))
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
            logger.info("calibration.layerwise: the float model is never loaded whole; skipping its perplexity")
        return None, _checkpoint_float_bytes(recipe)
    t0 = time.perf_counter()
    model = load_model(recipe, dist)
    timings["load"] = time.perf_counter() - t0
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
    return model, sum(t.numel() * t.element_size() for t in unique.values())


def _evaluate_before(p: Plan, model, store, timings: dict, quiet: bool, dist) -> float | None:
    """Perplexity of the float model (main process, whole model loaded), or the one a resumed run saved with the
    same evaluation settings; ``None`` when it is not measured."""
    ev = p.recipe["evaluation"]
    saved = store.get("ppl_before") if store is not None else None
    before = saved["value"] if saved and saved["evaluation"] == ev else None  # same evaluation settings only
    if ev["before"] and before is None and model is not None and dist.is_main:
        logger.info("perplexity of the float model")
        t0 = time.perf_counter()
        before = _perplexity(model, p.eval_ids, ev, quiet)
        timings["eval_before"] = time.perf_counter() - t0
        if store is not None:
            store.put("ppl_before", {"evaluation": ev, "value": before})
    return before


def _quantize(p: Plan, model, store, timings: dict, quiet: bool, dist) -> tuple[object, dict]:
    """Quantize ``model`` in place (or, layer-wise, load and quantize it); returns the model and its report."""
    recipe, cal = p.recipe, p.recipe["calibration"]
    options = dict(windows=p.windows, progress=not quiet, activations=cal["activations"],
                   offload_folder=cal["offload_folder"], dist=dist)
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
    return model, qreport


def _evaluate_after(p: Plan, model, timings: dict, quiet: bool) -> float | None:
    """Perplexity of the quantized model (``None`` when ``evaluation.after`` is off)."""
    ev = p.recipe["evaluation"]
    if not ev["after"]:
        return None
    logger.info("perplexity of the quantized model")
    t0 = time.perf_counter()
    after = _perplexity(model, p.eval_ids, ev, quiet)
    timings["eval_after"] = time.perf_counter() - t0
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


def _report(p: Plan, config, qreport: dict, source_bytes: int, before: float | None, after: float | None,
            partial: Path, timings: dict) -> dict:
    """``report.json``: the run's settings, the resolved quantization ``config`` (the saved model's, with its skip
    list and per-module schemes), perplexities, sizes, timings and the quantization report."""
    recipe, ev = p.recipe, p.recipe["evaluation"]
    windows = eval_windows(ev, p.eval_ids) if p.eval_ids is not None else 0
    report = {
        "model_name": recipe["model"],
        "dtype": recipe["dtype"],
        "config": config.to_dict(),
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
    if config.module_schemes:
        report["stored_bits"] = stored_average_bits(partial)
    auto = qreport.get("auto")
    if auto:  # the table itself is sensitivity.json
        report["auto"] = {k: v for k, v in auto.items() if k != "sensitivity"}
    return report


def push(folder: Path, repo_id: str, hub: dict) -> str:
    """Upload the output ``folder`` to ``repo_id``; the local paths it names are replaced by their last component
    (``local_path_names``)."""
    return push_folder(folder, repo_id, private=hub["private"], revision=hub["revision"],
                       commit_message=hub["commit_message"], replacements=local_path_names(folder))


def local_path_names(folder: Path) -> dict[str, str]:
    """Absolute local path -> its last component, for every local path the folder's recipe and report name (model,
    output, tokenizer, data and offload folders) and the folder itself, as written and resolved: what a push must not
    publish (a user name, a directory layout)."""
    folder = Path(folder)
    found: list[str] = [str(folder)]
    recipe_file = folder / RECIPE
    if recipe_file.is_file():
        try:
            saved = safe_load(recipe_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            saved = None
        if isinstance(saved, dict):
            cal, ev = saved.get("calibration") or {}, saved.get("evaluation") or {}
            found += [saved.get("model"), saved.get("output_dir"), cal.get("dataset"), cal.get("tokenizer"),
                      cal.get("offload_folder"), ev.get("dataset")]
    report_file = folder / REPORT
    if report_file.is_file():
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            report = None
        if isinstance(report, dict):
            found += [report.get("model_name"), (report.get("evaluation") or {}).get("dataset")]
    out: dict[str, str] = {}
    for value in found:  # relative paths say nothing of the machine (and a short one could match inside words)
        if not isinstance(value, str) or not value.strip() or not looks_local(value):
            continue
        path = Path(value).expanduser()
        for form in {value, str(path), str(path.resolve())}:
            if Path(form).is_absolute() and form != "/":
                out[form] = path.resolve().name or "."
    return out


__all__ = ["HFQuantError", "Plan", "execute", "plan", "push"]


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


def check_before_loading(config, model_config, dtype) -> None:
    """What can be checked on the architecture alone (meta device, no weights): every override pattern matches
    a quantizable module, ``target_avg_bits`` is reachable with the candidates, and the modules suit the scheme
    (``check_model_for_config``). Raises ``ConfigError``."""
    if not (config.overrides or config.target_avg_bits is not None or config.gguf_type is not None):
        return

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    keep = quantized_predicate(modules_left_float(model, config.modules_to_not_convert))
    check_model_for_config(model, config, keep)
    modules = quantizable_modules(model, keep)
    if config.overrides:
        resolve(config.overrides, list(modules), default_scheme(config))
    if config.target_avg_bits is not None:
        blocks_name, _ = find_blocks(model)
        table = {"candidates": [dict(c) for c in (config.candidates or DEFAULT_CANDIDATES)],
                 "modules": {n: dict(zip(("in", "out"), in_out_features(m))) for n, m in modules.items()
                             if n.startswith(blocks_name + ".")}}
        lo, hi = average_range(table, torch.finfo(dtype).bits)
        if config.target_avg_bits < lo:
            raise ConfigError(f"quantization.target_avg_bits: {config.target_avg_bits} is below {lo:.4f}, the smallest "
                              "average the candidates allow (counting scales, zeros and g_idx); raise it or add cheaper "
                              "candidates")
        if config.target_avg_bits > hi:
            logger.info("target_avg_bits %.4f is above %.4f, the largest candidates' average: every module gets them",
                        config.target_avg_bits, hi)
