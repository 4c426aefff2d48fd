"""Same checkpoint, same logits, every process.

Each test loads one saved checkpoint in two fresh Python processes and compares their logits bit for bit: a
prefill of 40 tokens, then greedy decode steps with the KV cache (one row each), through the default CPU paths.
The processes' path timings are rigged in opposite directions (one sees torch's int4 kernel and the 32 MB tiles
as instant, the other hfquant's dequantized tiles and the GEMV), as two processes on a busy machine can measure
them. By default the first process to meet a shape class records its choice for the machine and the second takes it
(``hfquant.kernels.choices``); before, each process timed for itself and the two processes' logits differed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import small_calibration, tiny_tokenizer

WORKER = r"""
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.kernels import common

favoured = sys.argv[2].split(",")
real = common._time_path


def rigged(fn, x, module):  # the favoured paths seem instant, the others slow
    seconds, y = real(fn, x, module)
    return (0.0 if any(name in getattr(fn, "__name__", "") for name in favoured) else 1.0 + seconds), y


common._time_path = rigged
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = (torch.arange(40) * 7 + 3).remainder(model.config.vocab_size)[None]
with torch.no_grad():
    out = model(ids, use_cache=True)
    logits = [out.logits]
    for _ in range(4):
        step = out.logits[:, -1:].argmax(-1)
        out = model(step, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
head = type(model.get_output_embeddings()).__name__
save_file({str(i): t.contiguous() for i, t in enumerate(logits)}, sys.argv[3], metadata={"head": head})
"""

RIGS = ("int4,big_tiles", "dequant_mm,half_cpu_gemv")  # what each of the two processes sees as fastest


def _logits_in_fresh_processes(folder, tmp_path) -> list[dict]:
    """Logits of the two rigged processes, which start with an empty record of the machine's path choices (the first
    records, the second reads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HFQUANT_CPU_", "HFQUANT_KERNEL"))}
    env["HFQUANT_CPU_CHOICES"] = str(tmp_path / "paths.json")
    results = []
    for i, rig in enumerate(RIGS):
        out = tmp_path / f"logits-{i}.safetensors"
        subprocess.run([sys.executable, "-c", WORKER, str(folder), rig, str(out)], check=True, env=env, timeout=600)
        results.append(load_file(str(out)))
    return results


def _bf16_valued_head(folder):
    """Round a saved float model's (untied) output head to bf16 values, as a model loaded from a bf16 checkpoint has
    them: a quantized model then holds the head in 16 bits (``HalfStoredLinear``) with paths of its own."""
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.bfloat16).float()
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8"])
def test_two_fresh_processes_give_bit_identical_logits(scheme, tiny_models, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig

    src = tmp_path / "float"
    shutil.copytree(tiny_models["qwen2"], src)  # an untied head
    _bf16_valued_head(src)
    kwargs = (dict(method="rtn", group_size=32) if scheme == "w4a16" else
              dict(method="smoothquant", tokenizer=tiny_tokenizer(), **small_calibration()))
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=HFQuantConfig(**kwargs))
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    first, second = _logits_in_fresh_processes(tmp_path / "q", tmp_path)
    assert first.keys() == second.keys() and len(first) == 5
    for step in first:
        assert torch.equal(first[step], second[step]), f"step {step}: max diff {(first[step] - second[step]).abs().max()}"
    from safetensors import safe_open

    from hfquant.kernels import cpu_ext

    with safe_open(str(tmp_path / "logits-0.safetensors"), "pt") as f:
        head = f.metadata()["head"]
    if cpu_ext.extension() is not None:  # the 16-bit head's paths were part of the comparison
        assert head == "HalfStoredLinear"


@pytest.mark.slow
def test_smollm2_w4_g128_logits_are_bit_identical_in_two_fresh_processes(tmp_path):
    """The done-when of issue 31: the SmolLM2 W4 g128 checkpoint (RTN here: the same modules and kernels as GPTQ's,
    without the calibration time) gives bit-identical logits in two fresh processes on this CPU's default paths."""
    from conftest import REFERENCE_MODEL
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant import HFQuantConfig

    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL, quantization_config=HFQuantConfig(method="rtn"))
    model.save_pretrained(tmp_path / "q")
    AutoTokenizer.from_pretrained(REFERENCE_MODEL).save_pretrained(tmp_path / "q")
    first, second = _logits_in_fresh_processes(tmp_path / "q", tmp_path)
    for step in first:
        assert torch.equal(first[step], second[step]), f"step {step}: max diff {(first[step] - second[step]).abs().max()}"
