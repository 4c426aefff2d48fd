"""The data of the bundled lm-eval task ``alice_next`` (``custom_dataset`` in alice_next.yaml): the items of
``alice_next.jsonl`` beside this file, read without the Hugging Face Hub."""

import json
from pathlib import Path

import datasets

ITEMS = Path(__file__).resolve().parent / "alice_next.jsonl"


def load(**kwargs):
    """``{"test": Dataset}``; lm-eval passes the task's metadata as keyword arguments (not used)."""
    rows = [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
