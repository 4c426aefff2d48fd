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


def _bos_tokenizer():
    """The tiny tokenizer with a BOS that it puts in front of every text (as Gemma's and Llama 3's do)."""
    from tokenizers import processors, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from helpers import tiny_tokenizer

    tok = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    eos = tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<eos>", eos_token="<eos>"), eos


def test_leading_bos_only_where_the_tokenizer_puts_one():
    from helpers import tiny_tokenizer

    from hfquant.calibration.data import leading_bos

    tok, bos = _bos_tokenizer()
    assert leading_bos(tok) == bos
    assert leading_bos(tiny_tokenizer()) is None  # no BOS token
    plain = tiny_tokenizer()
    plain.bos_token = "<eos>"  # a BOS token the tokenizer does not add (SmolLM2's case)
    assert leading_bos(plain) is None


def test_windows_start_with_bos_and_keep_the_text_in_order():
    from hfquant.calibration.data import with_bos

    ids = torch.arange(100, 1100)
    laid = with_bos(ids, 64, bos=7)
    windows = laid.reshape(-1, 64)
    assert windows.shape[0] == 1000 // 63 and bool((windows[:, 0] == 7).all())
    assert torch.equal(windows[:, 1:].reshape(-1), ids[: windows.shape[0] * 63])
    assert with_bos(ids, 64, None) is ids
    sampled = sample_windows(ids, 8, 64, seed=0, bos=7)
    assert sampled.shape == (8, 64) and bool((sampled[:, 0] == 7).all())
    assert all(torch.equal(w[1:], torch.arange(int(w[1]), int(w[1]) + 63)) for w in sampled)
    assert torch.equal(sample_windows(ids, 8, 64, seed=0), sample_windows(ids, 8, 64, seed=0, bos=None))


def test_perplexity_puts_bos_in_front_of_each_window(tiny_models):
    """With a BOS tokenizer, perplexity of a text equals perplexity of its token ids laid out BOS + seq_len - 1,
    and calibration windows start with BOS; without one, nothing changes."""
    from transformers import AutoModelForCausalLM

    from helpers import tiny_tokenizer

    from hfquant.calibration.data import BUNDLED_EVALUATION, calibration_windows, with_bos
    from hfquant.eval import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    text = BUNDLED_EVALUATION.read_text()[:20000]
    tok, bos = _bos_tokenizer()
    ids = tokenize_text(text, tok)
    ppl = perplexity(model, tok, text, seq_len=64, max_windows=4)
    assert ppl == perplexity(model, None, with_bos(ids, 64, bos), seq_len=64, max_windows=4)
    assert ppl != perplexity(model, None, ids, seq_len=64, max_windows=4)
    plain = tiny_tokenizer()
    assert perplexity(model, plain, text, seq_len=64, max_windows=4) == \
        perplexity(model, None, tokenize_text(text, plain), seq_len=64, max_windows=4)
    assert bool((calibration_windows(tok, num_samples=4, seq_len=32)[:, 0] == bos).all())
