"""Calibration text through ``datasets`` and seeded random token windows.

``dataset`` may be a list of strings, a local ``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet`` file
(loaded with the matching ``datasets`` builder), or a Hub dataset id (with optional config, split and
text column). ``None`` means the bundled WikiText-2 validation text.

Windows follow the GPTQ reference (``datautils.py``): the texts are joined, tokenized once, and
``num_samples`` windows of ``seq_len`` tokens start at offsets drawn uniformly with a seeded generator.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from hfquant.core.errors import CalibrationError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "wikitext2"
BUNDLED_CALIBRATION = BUNDLED_DIR / "valid.txt"
BUNDLED_EVALUATION = BUNDLED_DIR / "test.txt"
# The second evaluation text, not WikiText (public domain fiction; see data/alice/README.md). Evaluation only.
BUNDLED_EVALUATION_2 = BUNDLED_DIR.parent / "alice" / "test.txt"

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _pick_column(ds, column: str | None, source: str) -> str:
    names = list(ds.column_names)
    if column is not None:
        if column not in names:
            raise CalibrationError(f"calibration dataset {source}: column {column!r} not found; columns are {names}; set dataset_column to one of them")
        return column
    if "text" in names:
        return "text"
    string_cols = [n for n in names if getattr(ds.features[n], "dtype", None) in ("string", "large_string")]
    if len(string_cols) == 1:
        return string_cols[0]
    raise CalibrationError(f"calibration dataset {source}: cannot tell which column holds text among {names}; set dataset_column")


def load_texts(dataset=None, *, config_name: str | None = None, split: str | None = None,
               column: str | None = None) -> list[str]:
    """Return the calibration texts as a list of strings (see the module docstring for ``dataset``)."""
    import datasets  # heavy (pyarrow, pandas): imported only when calibration text is read

    if dataset is None:
        dataset = str(BUNDLED_CALIBRATION)
    if isinstance(dataset, (list, tuple)):
        if not dataset or not all(isinstance(t, str) for t in dataset):
            raise CalibrationError("calibration dataset: a list must hold at least one string and only strings")
        ds = datasets.Dataset.from_dict({"text": list(dataset)})
        source = f"<list of {len(dataset)} texts>"
    elif isinstance(dataset, (str, Path)):
        path = Path(dataset)
        suffix = path.suffix.lower()
        if path.exists() or suffix in _BUILDERS:
            if not path.is_file():
                raise CalibrationError(f"calibration dataset: file {str(path)!r} does not exist; give an existing .txt/.json/.jsonl/.csv/.parquet file, a list of strings or a Hub dataset id")
            if suffix not in _BUILDERS:
                raise CalibrationError(f"calibration dataset: unsupported file type {suffix!r} for {str(path)!r}; expected one of {sorted(_BUILDERS)}")
            builder = _BUILDERS[suffix]
            kwargs = {"keep_linebreaks": True} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
            except Exception as exc:  # datasets raises many types for unreadable files
                raise CalibrationError(f"calibration dataset: cannot read {str(path)!r} as {builder}: {exc}".splitlines()[0]) from None
            source = str(path)
        else:
            try:
                ds = datasets.load_dataset(str(dataset), config_name, split=split or "train")
            except Exception as exc:
                raise CalibrationError(f"calibration dataset: cannot load Hub dataset {dataset!r} (config={config_name!r}, split={split or 'train'!r}): {exc}".splitlines()[0]) from None
            source = str(dataset)
    else:
        raise CalibrationError(f"calibration dataset: expected a list of strings, a file path or a Hub id, got {type(dataset).__name__}")
    col = _pick_column(ds, column, source)
    texts = [t for t in ds[col] if isinstance(t, str)]
    if not any(t.strip() for t in texts):
        raise CalibrationError(f"calibration dataset {source}: column {col!r} holds no text")
    return texts


def join_texts(texts: list[str]) -> str:
    """Join texts for tokenization. Lines read from a .txt keep their line breaks, so they join with ''."""
    if all(t.endswith("\n") for t in texts):
        return "".join(texts)
    return "\n\n".join(texts)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, without extra special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device="cpu")  # host token ids; moved to the model's device per batch


def leading_bos(tokenizer) -> int | None:
    """The BOS token id when ``tokenizer`` puts one in front of every text it encodes (Gemma, Llama 3, Mistral), else
    ``None`` (GPT-2, Qwen2, SmolLM2). Such models always saw BOS at position 0 in training; a window cut from
    running text without it is out of their distribution (Gemma 3 270M, 4 WikiText-2 test windows of 512 tokens: PPL
    138.6 without, 54.3 with), so every calibration and evaluation window of theirs starts with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def with_bos(ids: torch.Tensor, seq_len: int, bos: int | None) -> torch.Tensor:
    """1-D token ids laid out so that each consecutive window of ``seq_len`` is ``bos`` then the next ``seq_len - 1``
    tokens of ``ids`` (a last partial window is dropped); ``ids`` unchanged when ``bos`` is ``None``."""
    if bos is None:
        return ids
    body = seq_len - 1
    n = ids.numel() // body
    chunks = ids[: n * body].reshape(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=ids.dtype, device=ids.device), chunks], dim=1).reshape(-1)


def evaluation_token_ids(text: str, tokenizer, seq_len: int) -> torch.Tensor:
    """``text``'s token ids laid out for windows of ``seq_len`` (``with_bos`` with the tokenizer's ``leading_bos``):
    what perplexity cuts into windows."""
    return with_bos(tokenize_text(text, tokenizer), seq_len, leading_bos(tokenizer))


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """``num_samples`` windows ``[num_samples, seq_len]`` at seeded uniform random offsets of ``ids``; with ``bos``,
    each window is ``bos`` then ``seq_len - 1`` tokens from its offset."""
    n = ids.numel()
    if n < seq_len + 1:
        raise CalibrationError(
            f"calibration text has {n} tokens but seq_len={seq_len} needs at least {seq_len + 1}; give more text or lower seq_len"
        )
    body = seq_len if bos is None else seq_len - 1
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - body, (num_samples,), generator=gen, device="cpu")
    windows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((num_samples, 1), bos, dtype=ids.dtype, device=ids.device), windows], dim=1)
    return windows


def calibration_windows(tokenizer, *, dataset=None, config_name=None, split=None, column=None,
                        num_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """Load, tokenize and sample the calibration set in one call (windows start with BOS for tokenizers that put
    one in front of every text: ``leading_bos``)."""
    texts = load_texts(dataset, config_name=config_name, split=split, column=column)
    return sample_windows(tokenize_text(join_texts(texts), tokenizer), num_samples, seq_len, seed,
                          bos=leading_bos(tokenizer))


def windows_for(config, tokenizer) -> torch.Tensor:
    """The calibration windows an ``HFQuantConfig`` asks for (its dataset, split, column, sample count, length and
    seed): the one call shared by ``hfquant run``'s checks and quantizing a loaded model."""
    return calibration_windows(tokenizer, dataset=config.dataset, config_name=config.dataset_config,
                               split=config.dataset_split, column=config.dataset_column,
                               num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed)


def fingerprint(windows: torch.Tensor) -> str:
    """Short sha256 of the calibration token ids, for reports and reproducibility checks."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def max_positions(config) -> int | None:
    """The longest sequence a model config allows (``None`` when it does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
