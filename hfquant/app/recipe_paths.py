"""The local paths a recipe names, checked before anything loads: the model folder and the calibration and
evaluation text files (present, a file, not empty, UTF-8); and ``RecipeError``, the one error of recipes (its
message starts with the key path)."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from hfquant.core.errors import ConfigError


class RecipeError(ConfigError):
    """A recipe is unreadable or does not match the schema; the message starts with the key path."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def recipe_error(path: str, problem: Exception | str) -> RecipeError:
    """The ``RecipeError`` for key ``path`` (``quantization.bits``, ``model``, ...): ``"<path>: <problem>"``, where an
    exception becomes the first line of its message (its type name when it has none). Callers ``raise`` it."""
    text = problem if isinstance(problem, str) else (str(problem).splitlines() or [type(problem).__name__])[0]
    return RecipeError(f"{path}: {text}")


def _type_name(v) -> str:
    if isinstance(v, str) and not v.strip():
        return "an empty string" if not v else "a blank string"
    return "null" if v is None else type(v).__name__


def looks_local(model: str) -> bool:
    """True when ``model`` must be a local folder: it exists, or it cannot be a Hub id."""
    return Path(model).expanduser().exists() or not _HUB_ID.match(model)


TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")  # read as UTF-8 text (parquet is binary)


def check_dataset_file(path: str, dataset) -> None:
    """A calibration or evaluation ``dataset``: a local file must exist, hold something and, as text, be UTF-8."""
    if isinstance(dataset, str) and not dataset.strip():
        raise recipe_error(path, f"got {_type_name(dataset)}; give a .txt/.json/.jsonl/.csv/.parquet file, a Hub "
                                 "dataset id, or null for the bundled WikiText-2")
    if isinstance(dataset, str) and looks_local(dataset):
        file = Path(dataset).expanduser()
        if file.is_dir():
            raise recipe_error(path, f"{dataset!r} is a folder, not a file; give a .txt/.json/.jsonl/.csv/.parquet "
                                     "file, a Hub dataset id, or null for the bundled WikiText-2")
        if not file.is_file():
            raise recipe_error(path, f"file {dataset!r} does not exist; give an existing .txt/.json/.jsonl/.csv/.parquet "
                                     "file, a Hub dataset id, or null for the bundled WikiText-2")
        if file.stat().st_size == 0:
            raise recipe_error(path, f"file {dataset!r} is empty; give a file with text")
        if file.suffix.lower() in TEXT_SUFFIXES:
            _check_utf8(path, dataset, file)
    if isinstance(dataset, list) and (not dataset or not all(isinstance(t, str) and t.strip() for t in dataset)):
        raise recipe_error(path, "a list of texts must hold at least one non-empty string and only strings")


def _check_utf8(path: str, dataset: str, file: Path) -> None:
    """Refuse a text file that is not UTF-8, naming the first bad byte (decoded a block at a time)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    raise recipe_error(path, f"file {dataset!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                                             f"at offset {offset - pending + exc.start} cannot be decoded); convert it "
                                             "to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise recipe_error(path, f"file {dataset!r} is not UTF-8 text (it ends inside a character); convert it to "
                                 "UTF-8") from None
    except OSError as exc:
        raise recipe_error(path, f"cannot read {dataset!r} ({exc.strerror})") from None


def check_model(model) -> None:
    """A recipe's ``model``: a Hub id, or a local folder with ``config.json``."""
    if model is None:
        raise recipe_error("model", "required; give a Hub id (org/name) or a local folder with config.json")
    if not isinstance(model, str) or not model.strip():
        raise recipe_error("model", f"must be a Hub id or a local folder path (a string), got {_type_name(model)}")
    if not looks_local(model):
        return
    folder = Path(model).expanduser()
    if folder.exists() and not folder.is_dir():
        raise recipe_error("model", f"{model!r} is a file, not a model folder; give the folder that holds its "
                                    "config.json and weights, or a Hub id (org/name)")
    if not folder.is_dir():
        raise recipe_error("model", f"local folder {model!r} does not exist; give an existing folder or a Hub id (org/name)")
    if not (folder / "config.json").is_file():
        raise recipe_error("model", f"{model!r} has no config.json; give a Hugging Face model folder")
