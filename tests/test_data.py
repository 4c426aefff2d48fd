import json

import pytest
import torch

from hfquant.calibration.data import join_texts, load_texts, sample_windows, tokenize_text
from hfquant.core.errors import CalibrationError

TEXTS = ["first line of text", "second line, a bit longer", "third"]


def test_list_of_strings():
    assert load_texts(TEXTS) == TEXTS


@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl", "csv", "parquet"])
def test_local_files(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(TEXTS) + "\n")
        assert join_texts(load_texts(path)) == "\n".join(TEXTS) + "\n"
        return
    if fmt == "json":
        path.write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(TEXTS)]))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    elif fmt == "csv":
        path.write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    else:
        import datasets

        datasets.Dataset.from_dict({"body": TEXTS, "n": [1, 2, 3]}).to_parquet(str(path))
    assert load_texts(path) == TEXTS


def test_bundled_default_is_wikitext_valid():
    texts = load_texts(None)
    assert join_texts(texts) == open(__import__("hfquant.calibration.data").calibration.data.BUNDLED_CALIBRATION).read()


def test_bundled_evaluation_texts_are_the_documented_files():
    import hashlib

    from hfquant.calibration.data import BUNDLED_EVALUATION, BUNDLED_EVALUATION_2

    assert hashlib.md5(BUNDLED_EVALUATION.read_bytes()).hexdigest() == "c532f8903d38e7ac68eb26be133c3c26"
    alice = BUNDLED_EVALUATION_2.read_text(encoding="utf-8")
    assert hashlib.md5(alice.encode()).hexdigest() == "9c784749de4e8f7b856c66b750a71d62"
    assert alice.startswith("ALICE'S ADVENTURES IN WONDERLAND") and "`" not in alice and "\r" not in alice


def test_missing_file_and_wrong_column(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(CalibrationError, match="column"):
        load_texts(path)
    with pytest.raises(CalibrationError, match="column 'zzz' not found"):
        load_texts(path, column="zzz")


def test_windows_are_seeded_and_length_checked():
    ids = torch.arange(1000)
    a = sample_windows(ids, 8, 64, seed=0)
    assert a.shape == (8, 64) and torch.equal(a, sample_windows(ids, 8, 64, seed=0))
    assert not torch.equal(a, sample_windows(ids, 8, 64, seed=1))
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 64)) for w in a)  # contiguous windows
    with pytest.raises(CalibrationError, match="needs at least"):
        sample_windows(torch.arange(10), 1, 64, seed=0)


def test_tokenize_adds_no_special_tokens():
    from helpers import tiny_tokenizer

    ids = tokenize_text("hello world", tiny_tokenizer())
    assert ids.dtype == torch.long and ids.numel() > 0
