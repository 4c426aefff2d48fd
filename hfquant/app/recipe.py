"""Recipes: one YAML file that describes a whole run (model, quantization, calibration, evaluation, Hub push).

The schema is strict and maps one-to-one onto the objects a run builds:

- top level: ``model`` (Hub id or local folder), ``output_dir``, and the ``from_pretrained`` arguments
  ``revision``, ``trust_remote_code``, ``dtype``, ``device``;
- ``quantization``: ``HFQuantConfig`` fields, by their flat names (only the ones the method uses,
  ``METHOD_FIELDS``), or grouped by section: ``gptq:``, ``smoothquant:``, ``gguf:``, ``mixed:`` mappings with the
  section's field names (``gptq: {bits: 3}`` is ``bits: 3``); the resolved recipe lists them flat;
- ``calibration``: the fields of ``CalibrationArgs``, by their names (``CALIBRATION_FIELDS`` maps them to the flat
  ones), and how the run holds the model and its activations (``LOADING_DEFAULTS``: ``layerwise``,
  ``activations``, ``offload_folder``);
- ``evaluation``: perplexity and lm-eval task accuracy, before/after (``EVALUATION_DEFAULTS``);
- ``hub``: where ``upload_folder`` pushes (``HUB_DEFAULTS``).

Every problem raises ``RecipeError`` (a ``ConfigError``) whose one-line message starts with the key path
(``quantization.group_size: ...``), before anything is loaded. Files are read with ``yaml.safe_load``'s loader,
refusing duplicate keys (``safe_load``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from hfquant.app.recipe_paths import (  # noqa: F401 - looks_local, recipe_error, RecipeError: also imported from here
    _type_name, check_dataset_file, check_model, looks_local, recipe_error, RecipeError,
)
from hfquant.calibration.spill import ACTIVATIONS
from hfquant.config import (
    _is_int, CalibrationArgs, DEFAULTS, FIELDS, HFQuantConfig, METHOD_FIELDS, resolve_method_fields,
)
from hfquant.core.errors import ConfigError
from hfquant.core.schemes import validate_overrides


TOP_DEFAULTS: dict[str, Any] = {
    "model": None,               # required
    "output_dir": None,          # required (or --output)
    "revision": None,
    "trust_remote_code": False,
    "dtype": "float32",
    "device": "cpu",
    "quantization": None,
    "calibration": None,
    "evaluation": None,
    "hub": None,
}
SECTIONS = ("quantization", "calibration", "evaluation", "hub")
DTYPES = ("float32", "bfloat16", "float16")

# Fields checked together (they constrain each other), after the one-by-one checks of the others.
_JOINT_FIELDS = ("bits", "target_avg_bits", "max_ppl_increase", "candidates", "overrides", "save_format")
# recipe key under ``calibration`` (a ``CalibrationArgs`` field) -> HFQuantConfig flat field
CALIBRATION_FIELDS: dict[str, str] = {s.name: s.flat for s in FIELDS if s.section == "calibration"}
# the sections ``quantization`` may group its keys under (calibration has its own recipe section)
QUANTIZATION_SECTIONS = ("gptq", "smoothquant", "gguf", "mixed")
# calibration keys that describe how the run loads the model and keeps activations (not saved in config.json)
LOADING_DEFAULTS: dict[str, Any] = {
    "layerwise": False,      # true: meta skeleton, one decoder layer's float weights loaded at a time
    "activations": "device",  # where hidden states live between blocks: device | cpu | disk
    "offload_folder": None,  # parent of the temporary folder for activations: disk (default: system temp)
}
EVALUATION_DEFAULTS: dict[str, Any] = {
    "before": True,        # evaluate the float model (perplexity, and the tasks)
    "after": True,         # evaluate the quantized model (perplexity, and the tasks)
    "dataset": None,       # None: bundled WikiText-2 test.txt
    "config": None,
    "split": None,
    "column": None,
    "seq_len": 512,
    "max_tokens": 16384,   # first max_tokens // seq_len windows (PPL-16K); null: every whole window
    "tasks": [],           # lm-eval task names (hfquant.eval.tasks), run after the perplexity; [] none
    "task_limit": None,    # first task_limit items of each task; null: all
    "num_fewshot": None,   # examples in front of each item; null: each task's default
    "task_batch_size": 8,  # lm-eval requests per forward pass
}
HUB_DEFAULTS: dict[str, Any] = {
    "repo_id": None,       # set it (or pass --push-to-hub) to push after the run
    "private": True,
    "revision": None,      # branch; created when missing
    "commit_message": None,
}
NOT_YET = {
    ("hub", "token"): "tokens are never read from recipes; log in with `hf auth login` or set HF_TOKEN",
}
class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (plain YAML keeps the last one silently,
    so a recipe with two ``bits:`` lines would run with whichever came last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (``_UniqueKeyLoader``); the only YAML reader of recipes."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _check_keys(path: str, section: dict, valid, extra_hint: str = "", unlisted=()) -> None:
    """Refuse keys not in ``valid`` (or ``unlisted``: accepted, not named in the message)."""
    for key in section:
        full = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            raise recipe_error(full, "keys must be strings")
        if (path, key) in NOT_YET:
            raise recipe_error(full, NOT_YET[(path, key)])
        if key not in valid and key not in unlisted:
            raise recipe_error(full, f"unknown key; valid keys are {sorted(valid)}{extra_hint}")


def _section(raw: dict, name: str, path: str | None = None) -> dict:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise recipe_error(path or name, f"must be a mapping of keys, got {_type_name(value)}")
    return value


def validate(raw) -> dict:
    """Check a parsed recipe against the schema; return it resolved (every default filled in)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: the top level must be a mapping with keys such as model and output_dir, got {_type_name(raw)}")
    _check_keys("", raw, TOP_DEFAULTS)
    out: dict[str, Any] = {k: copy.deepcopy(raw.get(k, v)) for k, v in TOP_DEFAULTS.items() if k not in SECTIONS}
    check_model(out["model"])
    _check_run_keys(out)
    out["quantization"] = _validate_quantization(_section(raw, "quantization"))
    out["calibration"] = _validate_calibration(_section(raw, "calibration"), out["quantization"]["method"])
    out["evaluation"] = validate_evaluation(_section(raw, "evaluation"))
    out["hub"] = _validate_hub(_section(raw, "hub"))
    return out


def _check_run_keys(out: dict) -> None:
    """``output_dir`` and the ``from_pretrained`` arguments."""
    if out["output_dir"] is not None and (not isinstance(out["output_dir"], str) or not out["output_dir"].strip()):
        raise recipe_error("output_dir", f"must be a folder path (a string), got {_type_name(out['output_dir'])}")
    if out["revision"] is not None and (not isinstance(out["revision"], str) or not out["revision"].strip()):
        raise recipe_error("revision", f"must be a branch, tag or commit (a string) or null, got {_type_name(out['revision'])}")
    if not isinstance(out["trust_remote_code"], bool):
        raise recipe_error("trust_remote_code", f"must be true or false, got {out['trust_remote_code']!r}")
    if out["dtype"] not in DTYPES:
        raise recipe_error("dtype", f"must be one of {list(DTYPES)}, got {out['dtype']!r}")
    dev = out["device"]
    if not isinstance(dev, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", dev):
        raise recipe_error("device", f"must be 'cpu', 'auto' (cuda when available) or 'cuda[:N]', got {dev!r}")


def _validate_quantization(q: dict) -> dict:
    """The ``quantization`` section resolved: ``method`` and every field it reads, flat (``resolve_method_fields``)."""
    method = q.get("method", "gptq")
    if method not in METHOD_FIELDS:
        raise recipe_error("quantization.method", f"must be one of {list(METHOD_FIELDS)}, got {method!r}")
    q, paths = _flat_quantization(q, method)
    validate_overrides(q.get("overrides"), paths.get("overrides", "quantization.overrides"))
    for key, value in q.items():
        if key not in _JOINT_FIELDS and key != "method":
            try:  # one field at a time, in a config of the method: the error is about that key
                HFQuantConfig(**{"method": method, key: value})
            except ConfigError as exc:
                raise recipe_error(paths[key], str(exc).split(": ", 1)[-1])
    try:
        return resolve_method_fields(q, method)
    except ConfigError as exc:
        field, _, rest = str(exc).removeprefix("HFQuantConfig.").partition(": ")
        key = re.match(r"\w*", field).group()  # overrides['x'].method -> overrides
        raise recipe_error(paths.get(key, f"quantization.{key}") + field[len(key):], rest)


def _flat_quantization(q: dict, method: str) -> tuple[dict, dict[str, str]]:
    """``q`` with its section mappings (``gptq: {bits: 3}``) spread into flat keys (``bits: 3``), and flat key -> the
    key path it was given at (for errors). Keys the method does not read are refused."""
    reads = METHOD_FIELDS[method]
    nested = {name: {s.name: s.flat for s in FIELDS if s.section == name and s.flat in reads}
              for name in QUANTIZATION_SECTIONS}
    nested = {name: keys for name, keys in nested.items() if keys}
    _check_keys("quantization", q, ("method", *reads), f" for method {method!r}", unlisted=nested)
    flat = {k: v for k, v in q.items() if k not in nested}
    paths = {k: f"quantization.{k}" for k in flat}
    for name in (k for k in q if k in nested):
        part = _section(q, name, f"quantization.{name}")
        _check_keys(f"quantization.{name}", part, nested[name], f" for method {method!r}")
        for key, value in part.items():
            if nested[name][key] in flat:
                raise recipe_error(f"quantization.{name}.{key}", f"also given as {paths[nested[name][key]]}; give it once")
            flat[nested[name][key]], paths[nested[name][key]] = value, f"quantization.{name}.{key}"
    return flat, paths


def _validate_calibration(c: dict, method: str) -> dict:
    """The ``calibration`` section resolved: every ``CalibrationArgs`` field and the loading keys."""
    _check_keys("calibration", c, {**CALIBRATION_FIELDS, **LOADING_DEFAULTS})
    for key, value in c.items():
        if key in LOADING_DEFAULTS:
            continue
        if key == "tokenizer" and value is not None and not isinstance(value, str):
            raise recipe_error("calibration.tokenizer", f"must be a tokenizer name or folder (a string) or null, got {_type_name(value)}")
        try:
            CalibrationArgs(**{key: value})
        except ConfigError as exc:
            raise recipe_error(f"calibration.{key}", str(exc).split(": ", 1)[-1])
    check_dataset_file("calibration.dataset", c.get("dataset"))
    out = {k: copy.deepcopy(c.get(k, DEFAULTS[f])) for k, f in CALIBRATION_FIELDS.items()}
    out.update(_loading(c, method))
    return out


def _validate_hub(h: dict) -> dict:
    _check_keys("hub", h, HUB_DEFAULTS)
    hub = {k: copy.deepcopy(h.get(k, v)) for k, v in HUB_DEFAULTS.items()}
    if hub["repo_id"] is not None:
        check_repo_id(hub["repo_id"], "hub.repo_id")
    if not isinstance(hub["private"], bool):
        raise recipe_error("hub.private", f"must be true or false, got {hub['private']!r}")
    for key in ("revision", "commit_message"):
        if hub[key] is not None and (not isinstance(hub[key], str) or not hub[key].strip()):
            raise recipe_error(f"hub.{key}", f"must be a non-empty string or null, got {hub[key]!r}")
    return hub


def validate_evaluation(e: dict) -> dict:
    """Check a recipe's ``evaluation`` section (also what ``hfquant eval`` is given); return it with every default
    filled in."""
    _check_keys("evaluation", e, EVALUATION_DEFAULTS)
    ev = {k: copy.deepcopy(e.get(k, v)) for k, v in EVALUATION_DEFAULTS.items()}
    for flag in ("before", "after"):
        if not isinstance(ev[flag], bool):
            raise recipe_error(f"evaluation.{flag}", f"must be true or false, got {ev[flag]!r}")
    if not _is_int(ev["seq_len"]) or ev["seq_len"] < 2:
        raise recipe_error("evaluation.seq_len", f"must be an integer >= 2, e.g. 512, got {ev['seq_len']!r}")
    if ev["max_tokens"] is not None and (not _is_int(ev["max_tokens"]) or ev["max_tokens"] < ev["seq_len"]):
        raise recipe_error("evaluation.max_tokens", f"must be null (all windows) or an integer >= evaluation.seq_len ({ev['seq_len']}), got {ev['max_tokens']!r}")
    if ev["dataset"] is not None and not isinstance(ev["dataset"], str):
        raise recipe_error("evaluation.dataset", f"must be a local file, a Hub dataset id, or null (bundled WikiText-2 test), got {_type_name(ev['dataset'])}")
    check_dataset_file("evaluation.dataset", ev["dataset"])
    for key in ("config", "split", "column"):
        if ev[key] is not None and (not isinstance(ev[key], str) or not ev[key].strip()):
            raise recipe_error(f"evaluation.{key}", f"must be a non-empty string or null, got {_type_name(ev[key])}")
    _validate_tasks(ev)
    return ev


def _validate_tasks(ev: dict) -> None:
    """``evaluation.tasks`` and the keys that go with it (names are checked against lm-eval by the run's plan)."""
    tasks = ev["tasks"]
    if tasks is None:
        tasks = ev["tasks"] = []
    if not isinstance(tasks, list) or not all(isinstance(t, str) and re.fullmatch(r"[\w.:\-]+", t) for t in tasks):
        raise recipe_error("evaluation.tasks", f"must be a list of lm-eval task names, e.g. [alice_next, hellaswag], "
                                               f"got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise recipe_error("evaluation.tasks", f"names a task twice ({tasks!r}); give each once")
    if tasks and not (ev["before"] or ev["after"]):
        raise recipe_error("evaluation.tasks", "no model would be evaluated (evaluation.before and evaluation.after "
                                               "are false); set evaluation.after: true or remove the tasks")
    for key, low in (("task_limit", 1), ("num_fewshot", 0), ("task_batch_size", 1)):
        value = ev[key]
        if (value is not None or key == "task_batch_size") and (not _is_int(value) or value < low):
            hint = "" if key == "task_batch_size" else " or null"
            raise recipe_error(f"evaluation.{key}", f"must be an integer >= {low}{hint}, got {value!r}")


def _loading(c: dict, method: str) -> dict:
    lo = {k: copy.deepcopy(c.get(k, v)) for k, v in LOADING_DEFAULTS.items()}
    if not isinstance(lo["layerwise"], bool):
        raise recipe_error("calibration.layerwise", f"must be true or false, got {lo['layerwise']!r}")
    if lo["activations"] not in ACTIVATIONS:
        raise recipe_error("calibration.activations", f"must be one of {list(ACTIVATIONS)}, got {lo['activations']!r}")
    if lo["activations"] != "device" and method == "smoothquant":
        raise recipe_error("calibration.activations", "only gptq moves activations off the device; SmoothQuant keeps them "
                                                      "there (set activations: device)")
    folder = lo["offload_folder"]
    if folder is not None and (not isinstance(folder, str) or not folder.strip()):
        raise recipe_error("calibration.offload_folder", f"must be a folder path (a string) or null, got {_type_name(folder)}")
    if folder is not None and lo["activations"] != "disk":
        raise recipe_error("calibration.offload_folder", "is only used with activations: disk; set activations: disk or remove it")
    return lo


def check_repo_id(repo_id, path: str = "repo_id") -> str:
    if not isinstance(repo_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}", repo_id):
        raise recipe_error(path, f"must be a Hub repo id 'owner/name' (letters, digits, - _ .), got {repo_id!r}")
    return repo_id


def parse_set(item: str) -> tuple[list[str], Any]:
    """``key.path=value`` (value read as YAML: ``8``, ``false``, ``null``, ``[a, b]``) -> (path, value)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. --set quantization.bits=8")
    try:
        parsed = safe_load(value) if value.strip() else None
    except yaml.constructor.ConstructorError as exc:
        raise RecipeError(f"--set {item!r}: {exc.problem}") from None
    except yaml.YAMLError:
        raise RecipeError(f"--set {item!r}: the value is not valid YAML; quote strings, e.g. --set 'model=\"org/name\"'") from None
    return [p.strip() for p in parts], parsed


def apply_sets(raw: dict, sets: list[str]) -> dict:
    """Apply ``--set`` overrides to a parsed recipe (a copy)."""
    raw = copy.deepcopy(raw)
    for item in sets:
        parts, value = parse_set(item)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read(path) -> Any:
    """Parse a recipe file with ``safe_load``; unreadable files, bad YAML and duplicate keys raise ``RecipeError``."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {str(p)!r}: " + ("is a folder, not a YAML file" if p.is_dir() else "file not found"))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {str(p)!r}: cannot read it ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    try:
        return safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise RecipeError(f"recipe {str(p)!r}: invalid YAML{where}: {problem}") from None


def load(path, sets: list[str] | None = None, output: str | None = None) -> dict:
    """Read, override (``--set``, ``--output``) and validate a recipe; returns the resolved recipe."""
    raw = read(path)
    if raw is None:
        raise RecipeError(f"recipe {str(path)!r}: the file is empty; it needs at least model and output_dir")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r}: the top level must be a mapping with keys such as model and output_dir, got {_type_name(raw)}")
    raw = apply_sets(raw, sets or [])
    if output is not None:
        raw["output_dir"] = output
    resolved = validate(raw)
    if resolved["output_dir"] is None:
        raise recipe_error("output_dir", "required; set it in the recipe or pass --output DIR")
    return resolved


def to_config(recipe: dict):
    """The ``HFQuantConfig`` of a resolved recipe."""
    return HFQuantConfig(**recipe["quantization"],
                         calibration={key: recipe["calibration"][key] for key in CALIBRATION_FIELDS})


def dump(recipe: dict) -> str:
    """The resolved recipe as YAML (what ``hfquant_recipe.yaml`` holds)."""
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)
