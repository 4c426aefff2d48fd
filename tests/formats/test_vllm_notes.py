"""``hfquant export``'s one-line notes on GPTQ files that vLLM refuses (``VLLMWarning``), as measured with vLLM 0.32
on CPU (``scripts/bench_vllm.py``, BENCHMARKS.md): a partial last group (vLLM allocates ``in // group_size`` groups
and stops on a bare AssertionError) and an asymmetric grid (*Unsupported quantization config: bits=4, sym=False*).

Each note is one line and says what to do instead; following its advice gives an export without a note."""

import re
import warnings

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hfquant import HFQuantConfig
from hfquant.app.cli import main as cli
from hfquant.formats import export_checkpoint
from hfquant.formats.gptq import _dividing_group_size, VLLMWarning


def _quantized(tiny_models, folder, **kw):
    """The tiny Llama (in_features 64 and 160) rounded to nearest with ``kw``, saved to ``folder``."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=HFQuantConfig(method="rtn", **kw))
    model.save_pretrained(folder)
    return folder, model


def _notes(src, fmt, out) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_checkpoint(src, fmt, out)
    return [str(w.message) for w in caught if issubclass(w.category, VLLMWarning)]


def _in_features(model) -> set[int]:
    return {m.in_features for n, m in model.model.layers.named_modules() if hasattr(m, "in_features")}


def test_partial_last_group_note_names_a_group_size_that_divides(tiny_models, tmp_path):
    src, model = _quantized(tiny_models, tmp_path / "g64", group_size=64)
    sizes = _in_features(model)
    assert any(n % 64 for n in sizes)  # down_proj: 160 = 64 + 64 + 32
    notes = _notes(src, "gptq", tmp_path / "g64-gptq")
    assert len(notes) == 1 and "\n" not in notes[0] and "vLLM" in notes[0] and "group_size=64" in notes[0]
    scales = load_file(str(tmp_path / "g64-gptq" / "model.safetensors"))["model.layers.0.mlp.down_proj.scales"]
    assert scales.shape[0] == 3  # ceil(160 / 64) groups in the file; vLLM allocates 160 // 64 = 2
    advised = int(re.search(r"re-quantize with group_size=(-?\d+)", notes[0]).group(1))
    assert 0 < advised < 64 and all(n % advised == 0 for n in sizes)
    src2, _ = _quantized(tiny_models, tmp_path / "advised", group_size=advised)
    assert _notes(src2, "gptq", tmp_path / "advised-gptq") == []


def test_asymmetric_gptq_note_points_to_compressed_tensors(tiny_models, tmp_path):
    src, _ = _quantized(tiny_models, tmp_path / "asym", group_size=32, sym=False)
    notes = _notes(src, "gptq", tmp_path / "asym-gptq")
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "sym=False" in notes[0] and "compressed-tensors" in notes[0] and "sym: true" in notes[0]
    assert _notes(src, "compressed-tensors", tmp_path / "asym-ct") == []  # what the note advises: no note
    sym, _ = _quantized(tiny_models, tmp_path / "sym", group_size=32)
    assert _notes(sym, "gptq", tmp_path / "sym-gptq") == []


def test_cli_prints_each_note_on_one_line(tiny_models, tmp_path, capsys):
    src, _ = _quantized(tiny_models, tmp_path / "asym-g64", group_size=64, sym=False)
    assert cli(["-q", "export", str(src), "--format", "gptq", str(tmp_path / "out")]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "vLLM" in ln]
    assert len(err) == 2 and all(ln.startswith("hfquant: warning: GPTQ export: ") for ln in err)  # partial + asym


@pytest.mark.parametrize("sizes, group_size, expected", [({576, 1536}, 128, 64), ({64, 160}, 64, 32), ({100}, 64, -1)])
def test_dividing_group_size(sizes, group_size, expected):
    g = _dividing_group_size(sizes, group_size)
    assert g == expected
    assert g == -1 or all(n % g == 0 for n in sizes)
