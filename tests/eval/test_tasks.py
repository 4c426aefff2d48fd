"""Task accuracy through lm-eval (hfquant.eval.tasks) and the bundled task alice_next.

The accuracy lm-eval reports for a quantized tiny Llama is recomputed here from the model's own log-likelihoods of
each choice, so the number is checked, not only produced."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_config, tiny_tokenizer
import hfquant.eval.tasks as tasks
from hfquant.eval.tasks import check_tasks, evaluate_tasks, TaskError

ROOT = Path(__file__).resolve().parent.parent.parent
ITEMS = tasks.TASKS_DIR / "alice_next" / "alice_next.jsonl"


def _generator():
    spec = importlib.util.spec_from_file_location("make_alice_task", ROOT / "scripts" / "make_alice_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _items() -> list[dict]:
    return [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines()]


def test_the_bundled_file_is_what_the_seeded_generator_writes():
    gen = _generator()
    assert gen.to_jsonl(gen.build(gen.SOURCE.read_text(encoding="utf-8"))) == ITEMS.read_text(encoding="utf-8")


def test_items_have_one_true_next_sentence_and_fair_distractors():
    """The true choice follows the passage in the book (with the passage's separator); the others are elsewhere,
    distinct, of similar length, not in the passage; the label positions are spread over the four. (The task leaves
    out the lines that are not prose: rows of asterisks and "CHORUS." between the verses of a song.)"""
    text = ROOT.joinpath("hfquant/data/alice/test.txt").read_text(encoding="utf-8")
    book = " ".join(p for p in text.split("\n\n") if not p.strip().startswith(("* *", "CHORUS.")))
    book = " ".join(book.split())
    items = _items()
    assert len(items) == 500 and tasks.bundled_tasks() == ["alice_next"]
    for it in items:
        choices, label, context = it["choices"], it["label"], it["context"]
        assert len(choices) == 4 == len(set(choices)) and 0 <= label < 4
        assert context.endswith((" ", "\n\n")) and context.strip()
        tail = " ".join(context.split()[-6:])
        assert f"{tail} {choices[label]}" in book
        for k, c in enumerate(choices):
            assert c not in context
            if k != label:
                assert f"{tail} {c}" not in book
                assert abs(len(c) - len(choices[label])) <= 0.15 * len(choices[label]) + 1e-9
    counts = [sum(it["label"] == k for it in items) for k in range(4)]
    assert min(counts) > 100, counts


def _choice_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """log P(choice | context) from the model's logits, as the task defines it: the context's trailing whitespace
    goes to the front of the choice, the choice's tokens are those of context + choice after the context's."""
    n = len(context) - len(context.rstrip())
    context, choice = context[:len(context) - n], context[len(context) - n:] + choice
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


@pytest.fixture(scope="module")
def quantized_llama():
    """A tiny Llama from a config (1024 positions: the passages fit), quantized in memory with RTN W4 g32."""
    from transformers import AutoModelForCausalLM

    from hfquant.api import quantize_
    from hfquant.config import HFQuantConfig

    config = tiny_config("llama")
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    quantize_(model, HFQuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    return model


def test_accuracy_is_the_models_own_choice_on_each_item(quantized_llama):
    """lm-eval's acc and acc_norm over the first 8 items equal the fractions where the choice with the highest
    log-likelihood (per character, for acc_norm) computed here from the model is the true one; the stderr is the
    sample standard error; the tokenizer (lm-eval sets a pad token) and the global RNG are left as they were."""
    model, tok, limit = quantized_llama, tiny_tokenizer(), 8
    rng = torch.random.get_rng_state()
    got = evaluate_tasks(model, tok, ["alice_next"], limit=limit)
    assert torch.equal(torch.random.get_rng_state(), rng) and tok.pad_token is None
    row = got["tasks"]["alice_next"]
    assert (row["n"], row["num_fewshot"], got["limit"]) == (limit, 0, limit) and got["lm_eval"].startswith("0.4.")
    hits = {"acc": 0, "acc_norm": 0}
    for it in _items()[:limit]:
        lls = [_choice_loglikelihood(model, tok, it["context"], c) for c in it["choices"]]
        for metric, scores in (("acc", lls), ("acc_norm", [ll / len(c) for ll, c in zip(lls, it["choices"])])):
            top = sorted(scores, reverse=True)
            assert top[0] - top[1] > 1e-4  # no near-tie that float noise could flip
            hits[metric] += scores.index(top[0]) == it["label"]
    for metric, hit in hits.items():
        p = hit / limit
        assert 0.0 <= row[metric] <= 1.0 and row[metric] == pytest.approx(p, abs=1e-12), metric
        assert row[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (limit - 1)), rel=1e-9)


@pytest.fixture
def small_index(monkeypatch):
    """lm-eval's task index limited to the bundled tasks and lm-eval's own hellaswag folder (indexing all of
    lm-eval's tasks takes seconds)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    hellaswag = Path(lm_eval.__file__).parent / "tasks" / "hellaswag"
    monkeypatch.setattr(tasks, "_manager", lambda include_defaults: TaskManager(
        include_path=[str(tasks.TASKS_DIR), str(hellaswag)], include_defaults=False))


def test_a_hub_task_offline_fails_in_one_line(small_index, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError) as e:
        check_tasks(["alice_next", "hellaswag"], "--tasks")
    message = str(e.value)
    assert message.startswith("--tasks: task 'hellaswag' needs its data set from the Hugging Face Hub")
    assert "HF_HUB_OFFLINE" in message and "alice_next" in message and "\n" not in message


def test_an_unknown_task_fails_in_one_line(small_index):
    with pytest.raises(TaskError) as e:
        check_tasks(["alice_nxt"])
    assert str(e.value).startswith("evaluation.tasks: unknown task 'alice_nxt'; bundled tasks are ['alice_next']")
    assert "\n" not in str(e.value)


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ModuleNotFoundError
    with pytest.raises(TaskError) as e:
        check_tasks(["alice_next"])
    assert str(e.value) == ("evaluation.tasks: task accuracy needs lm-eval, which is not installed; "
                            "pip install 'hfquant[tasks]'")
    check_tasks([])  # no tasks: lm-eval is not needed
