"""Slow tests on the real SmolLM2-135M reference model (hidden size 576: partial groups at g128)."""

import pytest
import torch

from conftest import REFERENCE_MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer_and_text():
    from transformers import AutoTokenizer

    from hfquant.calibration.data import BUNDLED_EVALUATION

    return AutoTokenizer.from_pretrained(REFERENCE_MODEL), BUNDLED_EVALUATION.read_text()


def test_gptq_g128_partial_groups_beats_rtn_and_reloads(tmp_path, tokenizer_and_text):
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig
    from hfquant.eval import perplexity
    from hfquant.nn.weight_only import QuantLinearWeightOnly

    tok, text = tokenizer_and_text
    windows = 6
    ppl = {}
    for name, cfg in {
        "rtn": HFQuantConfig(method="rtn", group_size=128, sym=True),
        "gptq": HFQuantConfig(group_size=128, sym=True, num_samples=32, desc_act=True),
    }.items():
        model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL, quantization_config=cfg)
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, QuantLinearWeightOnly) and q.scales.shape == (576, 5)  # 4 whole groups + 64 columns
        ppl[name] = perplexity(model, tok, text, seq_len=512, max_windows=windows)
        if name == "gptq":
            model.save_pretrained(tmp_path / "q")
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
            ids = tok(text[:3000], return_tensors="pt")["input_ids"][:, :200]
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    fp = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL)
    ppl["fp32"] = perplexity(fp, tok, text, seq_len=512, max_windows=windows)
    assert ppl["fp32"] < ppl["gptq"] < ppl["rtn"], ppl
