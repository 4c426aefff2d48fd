import math

import torch
import torch.nn.functional as F

from hfquant.eval import load_metric, perplexity


def test_perplexity_matches_manual_computation(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = torch.randint(0, 300, (3 * 16 + 5,))
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(2):
            w = ids[k * 16 : (k + 1) * 16][None]
            logits = model(input_ids=w).logits[0]
            nll += float(F.cross_entropy(logits[:-1], w[0, 1:], reduction="sum"))
            n += 15
    assert math.isclose(perplexity(model, tok, ids, seq_len=16, max_windows=2), math.exp(nll / n), rel_tol=1e-6)


def test_evaluate_metric_module_loads_locally_and_agrees(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    text = "The quick brown fox jumps over the lazy dog. " * 40
    metric = load_metric()
    got = metric.compute(predictions=[text], model=model, tokenizer=tok, seq_len=32, max_windows=4)["perplexity"]
    assert math.isclose(got, perplexity(model, tok, text, seq_len=32, max_windows=4), rel_tol=1e-9)
