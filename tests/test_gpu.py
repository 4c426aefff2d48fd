"""Calibration on CUDA in bf16 and fp16, compared with the same run on the CPU (marked ``gpu``; skipped without
CUDA; ``bash scripts/gpu_check.sh`` runs them on a GPU machine).

Calibration windows are tokenized here from the bundled text and passed as ``windows=``, so these tests need
neither ``datasets`` nor the Hub (the GPU image has no ``datasets``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, tiny_tokenizer

pytestmark = pytest.mark.gpu

CASES = {
    "gptq": dict(method="gptq", group_size=32),
    "gptq-asym-dynamic-groups": dict(method="gptq", group_size=32, sym=False, static_groups=False),
    "rtn": dict(method="rtn", group_size=32),
    "smoothquant": dict(method="smoothquant"),
    "smoothquant-gptq-static": dict(method="smoothquant", alpha=0.5, weight_method="gptq", activation_scheme="static"),
    "auto": dict(method="gptq", group_size=32, bits="auto", target_avg_bits=4.0, fisher_windows=2),
}


def _windows() -> torch.Tensor:
    from hfquant.calibration.data import BUNDLED_CALIBRATION, sample_windows, tokenize_text

    ids = tokenize_text(BUNDLED_CALIBRATION.read_text()[:200_000], tiny_tokenizer())
    return sample_windows(ids, 8, 64, 0)


def quantized_on(device: str, dtype: torch.dtype, case: str):
    """A tiny Llama in ``dtype`` on ``device``, quantized with ``CASES[case]``; returns (model, logits)."""
    import transformers as tf

    import hfquant

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama")).to(dtype).to(device).eval()
    config = hfquant.HFQuantConfig(tokenizer=tiny_tokenizer(), num_samples=8, seq_len=64, calibration_batch_size=4,
                                   **CASES[case])
    hfquant.quantize_(model, config, windows=_windows(), progress=False)
    ids = _windows()[:2].to(device)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
    return model, logits


def _codes(model) -> dict[str, torch.Tensor]:
    from hfquant.nn.weight_only import QuantLinearWeightOnly
    from hfquant.nn.w8a8 import QuantLinearW8A8

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinearWeightOnly):
            out[n] = m.codes().cpu()
        elif isinstance(m, QuantLinearW8A8):
            out[n] = m.weight.detach().cpu().reshape(m.out_features, m.in_features).int()
    return out


def compare(device: str, dtype: torch.dtype, case: str) -> tuple[float, float]:
    """(share of codes equal, relative logit difference) between ``device`` and the CPU."""
    model_d, logits_d = quantized_on(device, dtype, case)
    model_c, logits_c = quantized_on("cpu", dtype, case)
    assert all(p.device.type == torch.device(device).type for p in model_d.parameters())
    a, b = _codes(model_d), _codes(model_c)
    assert a.keys() == b.keys() and a
    same = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    rel = float((logits_d - logits_c).norm() / logits_c.norm())
    return same, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_calibration_matches_cpu(case, dtype):
    same, rel = compare("cuda", dtype, case)
    assert same >= 0.99, f"codes agree on {same:.2%} of weights"
    assert rel < 0.05, f"logits differ by {rel:.3g} (relative)"


def test_from_pretrained_quantizes_on_the_gpu(tmp_path):
    from transformers import AutoModelForCausalLM

    import hfquant
    from helpers import save_tiny_model

    folder = save_tiny_model("llama", tmp_path / "llama")
    config = hfquant.HFQuantConfig(num_samples=8, seq_len=64, calibration_batch_size=4, group_size=32,
                                   dataset=[(folder.parent / "llama" / "config.json").read_text() * 50])
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", dtype=torch.bfloat16,
                                                     quantization_config=config)
    except ImportError as exc:  # list datasets go through `datasets`, absent on the GPU image
        pytest.skip(f"needs datasets: {exc}")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model.hfquant_report["modules"]
