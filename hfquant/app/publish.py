"""``--push-to-hub`` and ``hfquant push``: upload an output folder without the local paths its files name."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hfquant.app.hub import push_folder
from hfquant.app.recipe import looks_local, safe_load
from hfquant.app.report import RECIPE, REPORT


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
