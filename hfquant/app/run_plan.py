"""The plan of an ``hfquant run``: every check that needs no model weights, done before anything is loaded or written.

``plan`` checks the recipe, the model config (and, for a local folder, its tensors), the tokenizer, the calibration
and evaluation text, the lm-eval tasks, the output folder and the resume state, and writes nothing, so bad input
fails in seconds and leaves the disk untouched. ``hfquant.app.pipeline.execute`` then does the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hfquant.app.recipe import check_repo_id, looks_local, recipe_error, RecipeError, to_config
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
from hfquant.calibration.onload import checkpoint_files
from hfquant.config import DEFAULT_CANDIDATES
from hfquant.core.errors import CalibrationError, ConfigError, HFQuantError
from hfquant.core.schemes import resolve
from hfquant.core.weight_format import format_from_config
from hfquant.eval.tasks import check_tasks
from hfquant.formats.files import (
    check_output_dir,
    check_output_location,
    CheckpointError,
    OutputLock,
    progress_dir,
    weights_fingerprint,
)
from hfquant.integrations.transformers import modules_left_float, quantized_predicate
from hfquant.integrations.validate import validate_checkpoint
from hfquant.mixed.budget import average_range
from hfquant.mixed.resolve import default_scheme
from hfquant.nn.graph import find_blocks, in_out_features, quantizable_modules
from hfquant.quantize.entry import check_model_for_config

logger = logging.getLogger("hfquant.app.pipeline")  # the run's messages keep the logger name they always had
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


def load_kwargs(recipe: dict) -> dict:
    """The ``from_pretrained`` arguments every load of the recipe's model (config, tokenizer, weights) shares."""
    return {"revision": recipe["revision"], "trust_remote_code": recipe["trust_remote_code"]}


def run_device(name: str, dist=None) -> str:
    """The recipe's ``device`` as a torch device name (``auto``: CUDA when available; with several processes,
    ``cuda`` is this process's own GPU); raises ``RecipeError`` when CUDA is asked for but missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} requested but CUDA is not available; use device: cpu")
    if name == "cuda" and dist is not None and dist.active:  # one GPU per process
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    return name


def model_config(recipe: dict):
    try:
        return AutoConfig.from_pretrained(recipe["model"], **load_kwargs(recipe))
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
    _check_run_options(recipe, config.method, out, overwrite, resume, dist)
    mcfg = _checked_model_config(recipe, config)
    tokenizer, windows, eval_ids, eval_name = _tokens(recipe, config)
    ev = recipe["evaluation"]
    if ev["tasks"] and (ev["before"] or ev["after"]) and dist.is_main:  # lm-eval, the names, their data
        check_tasks(ev["tasks"])
    return Plan(recipe, config, out, tokenizer, windows, eval_ids, eval_name, resume, push_repo,
                resume_parts(recipe, mcfg, windows),
                time.perf_counter() - t0)


def _check_run_options(recipe: dict, method: str, out: Path, overwrite: bool, resume: bool, dist) -> None:
    """``--resume`` against the method, the calibration settings and an unfinished run in ``out``; the device; and,
    layer-wise, that a local model has the safetensors files it is read from."""
    if resume and method != "gptq":
        raise RecipeError(f"--resume: resuming is supported for quantization.method gptq only, not {method!r}; "
                          "rerun without --resume")
    if progress_dir(out).exists() and not resume and not overwrite:
        raise RecipeError(f"output_dir: an unfinished run was found in {str(progress_dir(out))!r}; pass --resume to "
                          "continue it or --overwrite to start over")

    run_device(recipe["device"])
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


def _checked_model_config(recipe: dict, config):
    """The model's config, checked: a local model's tensors match it, it is not already quantized, the sequence
    lengths fit its positions, and the quantization config suits its architecture (``check_before_loading``)."""
    method = config.method
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
    return mcfg


def _tokens(recipe: dict, config) -> tuple[object, torch.Tensor | None, torch.Tensor | None, str]:
    """``(tokenizer, calibration windows, evaluation ids, evaluation name)``; the windows are ``None`` for RTN,
    the evaluation ids (and an empty name) when neither ``evaluation.before`` nor ``evaluation.after`` is on."""
    source = recipe["calibration"]["tokenizer"] or recipe["model"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs(recipe))
    except Exception as exc:  # noqa: BLE001
        raise recipe_error("calibration.tokenizer", f"cannot load a tokenizer from {source!r} ({type(exc).__name__})") from None

    import datasets  # heavy (pyarrow, pandas): imported only when calibration text is read

    datasets.disable_progress_bars()  # "Generating train split" bars for local files are noise here
    windows = None
    if config.method != "rtn":
        try:
            windows = windows_for(config, tokenizer)
        except CalibrationError as exc:
            raise recipe_error("calibration", str(exc).removeprefix("calibration ")) from None
    eval_ids, eval_name = (None, "")
    ev = recipe["evaluation"]
    if ev["before"] or ev["after"]:
        eval_ids, eval_name = evaluation_ids(ev, tokenizer)
    return tokenizer, windows, eval_ids, eval_name


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


def check_before_loading(config, model_config, dtype) -> None:
    """What can be checked on the architecture alone (meta device, no weights): every override pattern matches
    a quantizable module, ``target_avg_bits`` is reachable with the candidates, and the modules suit the scheme
    (``check_model_for_config``). Raises ``ConfigError``."""
    if not (config.overrides or config.target_avg_bits is not None or format_from_config(config) is not None):
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
