"""Task accuracy through lm-evaluation-harness (``lm-eval`` 0.4.x, optional: ``pip install 'hfquant[tasks]'``).

The model is evaluated in the process that holds it -- the float model before quantization, the quantized one after,
or a reloaded checkpoint -- through lm-eval's Hugging Face wrapper (``HFLM(pretrained=<model object>)``), so what is
measured is the model hfquant built, with its own modules and kernels. Task names are lm-eval's: hfquant's bundled
tasks (``hfquant/data/tasks``, offline, e.g. ``alice_next``) and every task lm-eval ships (``hellaswag``,
``arc_easy``, ...), whose data come from the Hugging Face Hub.

``check_tasks`` does what can be done before any weights are loaded (lm-eval importable, the names known, the data
readable), so a typo or an offline machine fails in seconds with one line; ``evaluate_tasks`` runs them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from hfquant.core.errors import HFQuantError

TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
INSTALL_HINT = "pip install 'hfquant[tasks]'"
_TRUE = {"1", "ON", "YES", "TRUE"}
_NOT_METRICS = {"alias", "sample_len", "sample_count"}  # what lm-eval puts beside a task's metrics


class TaskError(HFQuantError, ValueError):
    """A task cannot be run: lm-eval is missing, the name is unknown, or its data cannot be read."""


def bundled_tasks() -> list[str]:
    """Names of the tasks hfquant ships (one folder with ``<name>.yaml`` each under ``hfquant/data/tasks``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*/*.yaml") if p.stem == p.parent.name)


def offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def lm_eval_version(where: str = "evaluation.tasks") -> str:
    """lm-eval's version; ``TaskError`` naming the extra to install when it is missing."""
    try:
        import lm_eval  # optional dependency: only task evaluation needs it
    except ModuleNotFoundError as exc:
        if exc.name != "lm_eval":
            raise TaskError(f"{where}: lm-eval is installed but cannot be imported (no module {exc.name!r}); "
                            f"{INSTALL_HINT} installs the versions hfquant is tested with") from None
        raise TaskError(f"{where}: task accuracy needs lm-eval, which is not installed; {INSTALL_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. lm-eval 0.4.9 under transformers 5 (AttributeError)
        first = (str(exc).splitlines() or [""])[0][:200]
        raise TaskError(f"{where}: lm-eval is installed but cannot be imported ({type(exc).__name__}: {first}); "
                        f"{INSTALL_HINT} installs the versions hfquant is tested with") from None
    return getattr(lm_eval, "__version__", "unknown")


@contextlib.contextmanager
def _quiet():
    """lm-eval's info and warning logs (a warning for every model object it is given, one for every bundled task's
    data loader) and its deprecation warnings off; errors still show."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _rng_kept():
    """``simple_evaluate`` seeds Python's, NumPy's and torch's global generators; the run's own randomness after it
    (calibration sampling) must not depend on whether tasks were evaluated before it."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def task_manager(names: list[str]):
    """An lm-eval ``TaskManager`` that knows the bundled tasks, and lm-eval's own only when a name is not bundled
    (indexing lm-eval's thousands of task files takes seconds: done once per process)."""
    return _manager(any(n not in bundled_tasks() for n in names))


@functools.lru_cache(maxsize=2)
def _manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager  # optional dependency (lm_eval_version has checked it)

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _load(manager, name: str):
    """The task objects of ``name`` (lm-eval 0.4.12+: ``TaskManager.load``; before: ``get_task_dict``)."""
    if hasattr(manager, "load"):
        return manager.load([name])
    from lm_eval.tasks import get_task_dict  # optional dependency; lm-eval 0.4.10 and 0.4.11

    return get_task_dict([name], manager)


def task_names(value: str) -> list[str]:
    """``a,b`` (the command line's ``--tasks``) as a list of names; ``none`` is no task."""
    return [] if value.strip().lower() == "none" else [t.strip() for t in value.split(",") if t.strip()]


def check_tasks(names: list[str], where: str = "evaluation.tasks") -> None:
    """Before any weights are loaded: lm-eval is installed, every name is a task (or group) it knows, and its data
    can be read -- a task whose data is on the Hub fails in one line when the Hub is switched off and the data is not
    in the local cache. Raises ``TaskError`` whose message starts with ``where``. No names: nothing to check."""
    if not names:
        return
    lm_eval_version(where)
    with _quiet():
        manager = task_manager(names)
        known = set(manager.all_tasks)
        for name in names:
            if name not in known:
                raise TaskError(f"{where}: unknown task {name!r}; bundled tasks are {bundled_tasks()}, lm-eval's own "
                                "are listed by `lm-eval ls tasks`")
            try:
                _load(manager, name)
            except Exception as exc:  # noqa: BLE001 - datasets/Hub errors of every kind: one line, below
                raise TaskError(_load_failure(where, name, exc)) from None


def _load_failure(where: str, name: str, exc: Exception) -> str:
    if name not in bundled_tasks() and offline():
        return (f"{where}: task {name!r} needs its data set from the Hugging Face Hub, and the Hub is off "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); run once online to cache it, or use a bundled task "
                f"({', '.join(bundled_tasks())})")
    first = (str(exc).splitlines() or [""])[0][:300]
    return f"{where}: task {name!r} could not be loaded ({type(exc).__name__}: {first}); check the name and its data"


def evaluate_tasks(model, tokenizer, names: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int = 8) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (already loaded, float or quantized) for the tasks ``names``.

    Args:
        model: a causal LM (``PreTrainedModel``), evaluated where it is.
        tokenizer: its tokenizer (a copy is given to lm-eval, which may set a pad token on it).
        names: lm-eval task or group names.
        limit: evaluate the first ``limit`` items of each task (``None``: all).
        num_fewshot: examples in front of each item (``None``: each task's default, 0 for the bundled ones).
        batch_size: requests per forward pass.

    Returns:
        ``{"lm_eval": version, "limit", "num_fewshot", "tasks": {name: row}}``, a row being the task's metrics
        (``acc``, ``acc_stderr``, ``acc_norm``, ...), ``n`` (items evaluated), ``num_fewshot`` and ``version``.
    """
    version = lm_eval_version()
    import lm_eval  # optional dependency (checked just above)
    from lm_eval.models.huggingface import HFLM  # optional dependency

    was_training = model.training
    model.eval()
    try:
        with _quiet(), _rng_kept():
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=task_manager(names), limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False)
    finally:
        model.train(was_training)
    return {"lm_eval": version, "limit": limit, "num_fewshot": num_fewshot, "tasks": summarize(out)}


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def summarize(out: dict) -> dict:
    """``{task: row}`` from ``simple_evaluate``'s results: every metric (``acc``; a filter other than ``none`` is
    kept in the name, ``exact_match,strict-match``) with its ``_stderr``, and ``n``, ``num_fewshot``, ``version``."""
    rows = {}
    for task, metrics in out["results"].items():
        row = {"n": (out.get("n-samples", {}).get(task) or {}).get("effective"),
               "num_fewshot": out.get("n-shot", {}).get(task), "version": out.get("versions", {}).get(task)}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in _NOT_METRICS or name.endswith("_stderr") or _number(value) is None and value != "N/A":
                continue
            label = name if filt in ("", "none") else f"{name},{filt}"
            row[label] = _number(value)
            row[f"{label}_stderr"] = _number(metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr"))
        rows[task] = row
    return rows
