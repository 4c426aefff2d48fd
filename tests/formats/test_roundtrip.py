"""Quantize -> save -> reload in a fresh process gives bit-identical outputs, for each family."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfquant import HFQuantConfig
from hfquant.nn.weight_only import QuantLinearWeightOnly
from hfquant.nn.w8a8 import QuantLinearW8A8
from helpers import auto_class, small_calibration

CASES = {
    "llama-gptq": ("llama", dict(group_size=32)),
    "llama-gptq-actorder-asym": ("llama", dict(group_size=32, desc_act=True, sym=False)),
    "llama-gptq-w3-static": ("llama", dict(bits=3, group_size=48, desc_act=True, static_groups=True)),
    "llama-rtn-w8": ("llama", dict(method="rtn", bits=8, group_size=-1)),
    "llama-gptq-head8": ("llama", dict(group_size=32, lm_head_bits=8)),  # tied head: untied, 8-bit
    "qwen2-gptq": ("qwen2", dict(group_size=32, true_sequential=False)),
    "qwen2-rtn-head8": ("qwen2", dict(method="rtn", group_size=32, lm_head_bits=8)),  # untied head
    "opt-gptq": ("opt", dict(group_size=32)),
    "gpt2-gptq": ("gpt2", dict(group_size=32)),
    "bert-gptq": ("bert", dict(group_size=32)),
    "llama-smoothquant-auto": ("llama", dict(method="smoothquant", alpha="auto")),
    "opt-smoothquant-gptq-static": ("opt", dict(method="smoothquant", alpha=0.5, weight_method="gptq",
                                                activation_scheme="static")),
    "gpt2-w8a8-nosmooth": ("gpt2", dict(method="smoothquant", alpha=None)),
    "bert-smoothquant": ("bert", dict(method="smoothquant", alpha=0.5)),
}
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _out(model):
    out = model(input_ids=IDS)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach()


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    result = {}
    for case, (arch, kw) in CASES.items():
        cls = auto_class(arch)
        fp = cls.from_pretrained(tiny_models[arch]).eval()
        q = cls.from_pretrained(tiny_models[arch], quantization_config=HFQuantConfig(**small_calibration(**kw))).eval()
        folder = root / case
        q.save_pretrained(folder)
        with torch.no_grad():
            save_file({"out": _out(q), "fp": _out(fp)}, str(root / f"{case}.out.safetensors"))
        result[case] = (arch, folder, root / f"{case}.out.safetensors", q)
    return result


RELOAD = textwrap.dedent("""
    import json, sys, torch
    import hfquant
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    bad = []
    for arch, folder, ref in json.loads(sys.argv[2]):
        cls = AutoModel if arch == "bert" else AutoModelForCausalLM
        m = cls.from_pretrained(folder).eval()
        with torch.no_grad():
            out = m(input_ids=ids)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if not torch.equal(out, load_file(ref)["out"]):
            bad.append(folder)
    print(json.dumps(bad))
""")


def test_fresh_process_reload_is_bit_identical(saved):
    items = [[arch, str(folder), str(ref)] for arch, folder, ref, _ in saved.values()]
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(IDS.tolist()), json.dumps(items)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_structure_and_sanity(saved, case):
    arch, folder, ref, model = saved[case]
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinearWeightOnly, QuantLinearW8A8))]
    assert len(quantized) >= 4 * 2  # at least 4 Linears per block, 2 blocks
    out = load_file(str(ref))
    q, fp = out["out"], out["fp"]
    cos = torch.nn.functional.cosine_similarity(q.flatten(), fp.flatten(), dim=0)
    assert cos > 0.9, f"quantized output far from float: cosine {cos:.3f}"
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "hfquant" and cfg["dataset"] is None
    if arch != "bert" and "head8" not in case:
        head = model.get_output_embeddings()
        assert not isinstance(head, (QuantLinearWeightOnly, QuantLinearW8A8)) and head.weight.is_floating_point()
    assert type(model.get_input_embeddings()).__name__ == "Embedding"


def test_tied_embeddings_stay_tied_and_float(saved):
    _, folder, _, model = saved["llama-gptq"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys


@pytest.mark.parametrize("case", ["llama-gptq-head8", "qwen2-rtn-head8"])
def test_lm_head_bits_quantizes_the_head_and_unties_it(saved, tiny_models, case):
    """``lm_head_bits: 8``: the head is 8-bit per channel, the input embeddings keep the float tensor (also
    when they were tied), the config says untied, and both are in the checkpoint."""
    from transformers import AutoModelForCausalLM

    arch, folder, ref, model = saved[case]
    head = model.lm_head
    assert isinstance(head, QuantLinearWeightOnly) and (head.bits, head.group_size) == (8, -1)
    fp = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    assert torch.equal(model.model.embed_tokens.weight, fp.model.embed_tokens.weight)
    rel = (head.dequantize() - fp.lm_head.weight).norm() / fp.lm_head.weight.norm()
    assert rel < 1e-2, rel  # 8-bit per-channel RTN of the float head
    saved_cfg = json.loads((folder / "config.json").read_text())
    assert saved_cfg["tie_word_embeddings"] is False and saved_cfg["quantization_config"]["lm_head_bits"] == 8
    assert "lm_head" not in saved_cfg["quantization_config"]["modules_to_not_convert"]
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert {"lm_head.weight", "lm_head.scales", "model.embed_tokens.weight"} <= set(keys)
    assert model.hfquant_report["modules"][-1]["name"] == "lm_head"


def test_lm_head_bits_on_a_model_without_a_head_is_a_one_line_error(tiny_models):
    from transformers import AutoModel

    from hfquant.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        AutoModel.from_pretrained(tiny_models["bert"], quantization_config=HFQuantConfig(method="rtn", lm_head_bits=8))
    assert "no Linear output head" in str(e.value) and "lm_head_bits: null" in str(e.value) and "\n" not in str(e.value)


def test_a_quantized_head_is_not_exported_to_formats_with_a_float_head(saved, tmp_path):
    from hfquant.core.errors import FormatError
    from hfquant.formats.export import export_checkpoint

    _, folder, _, model = saved["qwen2-rtn-head8"]
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(FormatError, match="lm_head_bits: 8"):
            export_checkpoint(folder, fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()


NO_HFQUANT = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
    except Exception as e:
        print("RAISED", type(e).__name__, str(e).replace("\\n", " "))  # older transformers name the mismatch here
        sys.exit(3)
    print("LOADED")
""")


def test_loading_without_hfquant_fails_loudly(saved):
    """Without `import hfquant` transformers skips the unknown quant method; the 3-D packed `weight`
    then cannot load into nn.Linear's 2-D weight, so it raises instead of random-initialising."""
    _, folder, _, _ = saved["llama-gptq"]
    proc = subprocess.run([sys.executable, "-c", NO_HFQUANT, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-1000:]
    # both: it raised, and what it reported is the packed weight's size mismatch (not some other failure)
    assert "RAISED" in proc.stdout, proc.stdout
    assert "size mismatch" in (proc.stdout + proc.stderr).lower(), proc.stderr[-2000:]


def test_sharded_save_reloads_identically(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, ref, model = saved["llama-gptq-actorder-asym"]
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob("*.bin"))  # safetensors only
    with torch.no_grad():
        assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), load_file(str(ref))["out"])
