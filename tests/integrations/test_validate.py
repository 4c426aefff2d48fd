"""``validate_checkpoint`` (issue 31, 6): every checkpoint hfquant and transformers write passes it, as they are; what
it refuses is in the bad-input battery (tests/app/test_cli_errors.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import auto_class, small_calibration, tiny_tokenizer

from hfquant import HFQuantConfig
from hfquant.formats.files import CheckpointError
from hfquant.integrations.validate import validate_checkpoint


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2", "bert", "gemma3"])
def test_float_checkpoints_pass(tiny_models, arch):
    assert validate_checkpoint(tiny_models[arch]) == tiny_models[arch]


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(method="rtn", group_size=32)),
    ("gpt2", dict(method="rtn", group_size=32)),  # Conv1D modules
    ("qwen2", dict(method="rtn", group_size=32, lm_head_bits=8)),  # an untied 8-bit head
    ("llama", dict(method="rtn", group_size=32, overrides={"*.down_proj": {"bits": 8}, "*.v_proj": {"skip": True}})),
    ("llama", dict(method="smoothquant")),
    ("llama", dict(method="rtn", gguf_type="Q4_0")),  # tied head's blocks held on the embeddings
    ("qwen2", dict(method="rtn", gguf_type="Q8_0")),  # untied: blocks on both
])
def test_quantized_checkpoints_pass(tiny_models, tmp_path, arch, kwargs):
    model = auto_class(arch).from_pretrained(
        tiny_models[arch], quantization_config=HFQuantConfig(tokenizer=tiny_tokenizer(), **small_calibration(), **kwargs))
    model.save_pretrained(tmp_path / "q")
    validate_checkpoint(tmp_path / "q")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    validate_checkpoint(tmp_path / "sharded")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_exported_checkpoints_pass(tiny_models, tmp_path, fmt):
    import transformers as tf

    from hfquant.formats import export_checkpoint

    tf.AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], quantization_config=HFQuantConfig(method="rtn", group_size=32)).save_pretrained(tmp_path / "q")
    validate_checkpoint(export_checkpoint(tmp_path / "q", fmt, tmp_path / fmt))
    if fmt == "gptq":  # GPTQ is checked too: its config's bits against the packed words
        config = json.loads((tmp_path / fmt / "config.json").read_text())
        config["quantization_config"]["bits"] = 8
        (tmp_path / fmt / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=r"qweight in model.safetensors is I32 \[8, 64\].*GPTQ 8-bit"):
            validate_checkpoint(tmp_path / fmt)


def test_renamed_checkpoint_keys_pass(tmp_path):
    """A Mixtral checkpoint stores experts one by one; transformers merges them on load (its conversion mapping):
    the check renames keys as transformers does instead of calling them missing."""
    import transformers as tf

    cfg = tf.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, vocab_size=320)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    validate_checkpoint(tmp_path / "m")


def test_gguf_checkpoint_saved_without_held_blocks_still_loads(tiny_models, tmp_path):
    """A ``gguf_type`` checkpoint saved before the head's blocks were kept (no ``gguf_blocks``) passes, reloads with
    the same logits and exports (the head is rounded again there)."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from hfquant.formats import export_gguf

    model = tf.AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], quantization_config=HFQuantConfig(method="rtn", gguf_type="Q4_0"))
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    assert "model.embed_tokens.gguf_blocks" in state
    save_file({k: v for k, v in state.items() if not k.endswith(".gguf_blocks")}, tmp_path / "q" / "model.safetensors",
              metadata={"format": "pt"})
    validate_checkpoint(tmp_path / "q")
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)
    assert export_gguf(tmp_path / "q", tmp_path / "g").is_file()


def test_transformers_load_report_only_with_verbose(tiny_models, tmp_path, capsys, caplog):
    """What the check lets through (here an extra tensor, which transformers ignores) loads without transformers'
    load-report table (a warning of its logger); ``-v`` shows it."""
    import shutil

    from helpers import run_cli
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_models["llama"], tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    save_file({**state, "model.extra.weight": torch.zeros(3)}, tmp_path / "m" / "model.safetensors",
              metadata={"format": "pt"})
    argv = ["-q", "eval", tmp_path / "m", "--seq-len", "64", "--max-tokens", "128"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and "perplexity" in out, err
    assert "LOAD REPORT" not in caplog.text + err and "model.extra.weight" not in caplog.text + err
    code, _, err = run_cli(["-v", *argv], capsys)
    assert code == 0 and "model.extra.weight" in caplog.text + err
