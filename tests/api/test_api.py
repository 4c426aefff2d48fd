"""The public API: what ``hfquant`` exports, the config never being modified, ``save_format`` however
``save_pretrained`` is called, the config's hash rule, and the one recipe error helper."""

import collections.abc
import copy
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hfquant
from helpers import run_cli, small_calibration, tiny_tokenizer, write_recipe

ROOT = Path(__file__).resolve().parent.parent.parent
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
PUBLIC = {"HFQuantConfig", "quantize_", "quantize_layerwise", "QuantLinearWeightOnly", "QuantLinearW8A8",
          "export_checkpoint", "load_gptq", "perplexity", "HFQuantQuantizer"}
OLD_NAMES = ("QuantLinearW4A16", "HFQuantHfQuantizer", "quantize_in_place_", "hfquant.runner", "hfquant.interop")


# ------------------------------------------------------------------------------------------------ exports
def test_all_is_the_documented_api():
    assert set(hfquant.__all__) == PUBLIC
    assert set(hfquant._LAZY) == PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_export_resolves_and_has_a_docstring(name):
    obj = getattr(hfquant, name)
    assert obj.__name__ == name
    assert obj.__module__.startswith("hfquant.")
    doc = obj.__doc__  # the object's own docstring (inspect.getdoc would fall back to a base class's)
    assert doc and len(doc.split()) >= 12, f"{name}: missing or thin docstring {doc!r}"


def test_readme_documents_every_export_and_no_old_name():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Python API")
    api = readme[start:readme.index("\n## ", start + 1)]  # up to the next section
    for name in PUBLIC:
        assert f"`{name}" in api, name
    sources = [readme, *(p.read_text() for p in (ROOT / "hfquant").rglob("*.py"))]
    for old in OLD_NAMES:
        assert not any(old in text for text in sources), old


def test_import_hfquant_does_not_import_transformers():
    code = ("import sys, hfquant\n"
            "names = hfquant.__all__, dir(hfquant)\n"
            "print(sorted(m for m in ('transformers', 'datasets', 'evaluate') if m in sys.modules))\n"
            "hfquant.quantize_\n"
            "print('transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "True"]


# -------------------------------------------------------------------------------------------- config hash
def test_config_is_unhashable_because_it_is_mutable():
    from hfquant import HFQuantConfig

    a, b = HFQuantConfig(bits=3), HFQuantConfig(bits=3)
    assert a == b and a != HFQuantConfig(bits=4)
    assert HFQuantConfig.__hash__ is None
    assert not isinstance(a, collections.abc.Hashable)
    with pytest.raises(TypeError, match="unhashable type: 'HFQuantConfig'"):
        hash(a)
    with pytest.raises(TypeError):
        {a}


# ------------------------------------------------------------------------------------ config never modified
def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _saved_quantization_config(folder):
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]


def _check_untouched_and_reloads(cfg, before, model, tmp_path):
    from transformers import AutoModelForCausalLM

    assert cfg.to_dict() == before
    resolved = model.config.quantization_config
    assert resolved is not cfg
    model.save_pretrained(tmp_path / "q")
    assert _saved_quantization_config(tmp_path / "q") == resolved.to_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert reloaded.config.quantization_config == resolved
    assert torch.equal(_out(reloaded), _out(model))
    return resolved


@pytest.mark.parametrize("loader", ["auto", "class"])
def test_from_pretrained_does_not_modify_the_config(tiny_models, tmp_path, loader):
    # AutoModelForCausalLM deep-copies its keyword arguments; the model class itself hands over the caller's object
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from hfquant import HFQuantConfig

    cfg = HFQuantConfig(**small_calibration(group_size=32, tokenizer=tiny_tokenizer(),
                                            modules_to_not_convert=["model.layers.1.mlp.down_proj"],
                                            overrides={"*.layers.0.*": {"bits": 8},
                                                       "model.layers.1.self_attn.k_proj": {"skip": True}}))
    before = cfg.to_dict()
    cls = AutoModelForCausalLM if loader == "auto" else LlamaForCausalLM
    model = cls.from_pretrained(tiny_models["llama"], quantization_config=cfg).eval()
    resolved = _check_untouched_and_reloads(cfg, before, model, tmp_path)
    assert before["module_schemes"] is None and before["modules_to_not_convert"] == ["model.layers.1.mlp.down_proj"]
    assert resolved.module_schemes["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert {"lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj"} <= set(
        resolved.modules_to_not_convert)


def test_quantize_does_not_modify_the_config(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig

    cfg = HFQuantConfig(**small_calibration(bits="auto", target_avg_bits=4.5, fisher_windows=2,
                                            modules_to_not_convert=["model.layers.0.mlp.up_proj"],
                                            tokenizer=tiny_tokenizer()))
    before = cfg.to_dict()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    report = hfquant.quantize_(model, cfg, progress=False)
    assert report is model.hfquant_report and "auto" in report
    resolved = _check_untouched_and_reloads(cfg, before, model, tmp_path)
    assert resolved.module_schemes and "model.layers.0.mlp.up_proj" not in resolved.module_schemes
    assert "model.layers.0.mlp.up_proj" in resolved.modules_to_not_convert
    assert resolved.tokenizer is cfg.tokenizer  # a tokenizer object is shared with the quantizer's copy, not copied


def test_quantize_loaded_model_returns_the_schemes_without_writing_the_config(tiny_models):
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig
    from hfquant.quantize.entry import quantize_loaded_model_

    cfg = HFQuantConfig(method="rtn", group_size=32, overrides={"re:.*down_proj": {"bits": 8}})
    before = cfg.to_dict()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    report, schemes = quantize_loaded_model_(model, cfg, keep=lambda name: "lm_head" not in name)
    assert cfg.to_dict() == before
    assert schemes["model.layers.1.mlp.down_proj"] == {"bits": 8, "group_size": 32, "sym": True, "method": "rtn"}
    assert schemes["model.layers.1.mlp.up_proj"]["bits"] == 4
    assert [m["name"] for m in report["modules"]] == list(schemes)


def test_a_run_reports_the_resolved_config(tiny_models, tmp_path, capsys):
    """``hfquant run`` leaves its plan's config alone; report.json records the saved model's config."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "out",
                          quantization={"method": "rtn", "group_size": 32, "overrides": {"*.v_proj": {"bits": 8}}},
                          evaluation={"before": False})
    code, _, err = run_cli(["--quiet", "run", recipe], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"] == _saved_quantization_config(tmp_path / "out")
    assert report["config"]["module_schemes"]["model.layers.0.self_attn.v_proj"]["bits"] == 8
    assert "lm_head" in report["config"]["modules_to_not_convert"]
    assert report["stored_bits"] and report["evaluation"]["before"] is None and report["evaluation"]["after"] > 1
    assert list(report) == ["model_name", "dtype", "config", "evaluation", "source_mib", "checkpoint_bytes",
                            "damp_retries", "resumed_from_block", "timings", "versions", "quantization", "layers",
                            "stored_bits"]
    # (plus "kernel_build" after "prepare" when this run was the first to build hfquant's CPU kernels here)
    assert [k for k in report["timings"] if k != "kernel_build"] == ["prepare", "load", "quantize", "eval_after",
                                                                    "save", "total"]


# -------------------------------------------------------------------------------------------- save_format
@pytest.fixture(scope="module")
def rtn_models(tiny_models):
    """Two RTN llama models: one saving the GPTQ layout, one the default hfquant layout."""
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig

    return {fmt: AutoModelForCausalLM.from_pretrained(
                tiny_models["llama"], quantization_config=HFQuantConfig(method="rtn", group_size=32, save_format=fmt)).eval()
            for fmt in ("gptq", "hfquant")}


def _layout(folder):
    folder = Path(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    cfg = json.loads((folder / "config.json").read_text())
    qweight = any(k.endswith(".qweight") for k in keys)
    hfq = any(k.endswith(".zeros") for k in keys)
    return cfg["quantization_config"]["quant_method"], qweight, hfq, cfg["architectures"]


@pytest.mark.parametrize("call", ["instance", "class"])
def test_save_format_is_honoured_however_save_pretrained_is_called(rtn_models, tmp_path, call):
    from transformers import LlamaForCausalLM

    for fmt, model in rtn_models.items():
        out = tmp_path / fmt
        if call == "instance":
            model.save_pretrained(out)
        else:
            type(model).save_pretrained(model, out)
        method, qweight, hfq, archs = _layout(out)
        assert archs == ["LlamaForCausalLM"]
        if fmt == "gptq":
            assert (method, qweight, hfq) == ("gptq", True, False)
            assert (out / "quantize_config.json").is_file()
        else:
            assert (method, qweight, hfq) == ("hfquant", False, True)
        assert isinstance(model, LlamaForCausalLM) and type(model).__name__ == "LlamaForCausalLM"
        assert type(model).__qualname__ == LlamaForCausalLM.__qualname__
        assert type(model).__module__ == LlamaForCausalLM.__module__


def test_reloaded_model_keeps_its_class_name_and_save_format(rtn_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from hfquant.formats import load_gptq

    rtn_models["hfquant"].save_pretrained(tmp_path / "hfq")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hfq")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    type(reloaded).save_pretrained(reloaded, tmp_path / "again")
    assert _layout(tmp_path / "again") == ("hfquant", False, True, ["LlamaForCausalLM"])
    # a GPTQ checkpoint imported into hfquant modules saves hfquant's layout (its config was converted)
    rtn_models["gptq"].save_pretrained(tmp_path / "gptq")
    imported = load_gptq(tmp_path / "gptq")
    type(imported).save_pretrained(imported, tmp_path / "imported")
    assert _layout(tmp_path / "imported") == ("hfquant", False, True, ["LlamaForCausalLM"])


def test_deepcopy_and_pickle_keep_the_save_format(rtn_models, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from hfquant.formats.save_hook import install_save_format_hook as _install_save_format_hook

    clone = copy.deepcopy(rtn_models["gptq"])
    assert type(clone) is type(rtn_models["gptq"])
    type(clone).save_pretrained(clone, tmp_path / "clone")
    assert _layout(tmp_path / "clone")[:3] == ("gptq", True, False)
    # pickle finds classes by name: the hooked class is rebuilt from the original one
    plain = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    _install_save_format_hook(plain)
    cls = type(plain)
    _install_save_format_hook(plain)  # idempotent: one subclass per class, never stacked
    assert type(plain) is cls and cls.__bases__[-1] is LlamaForCausalLM
    assert [c for c in cls.__mro__ if c.__name__ == "LlamaForCausalLM"] == [cls, LlamaForCausalLM]
    back = pickle.loads(pickle.dumps(plain))
    assert type(back) is cls
    assert torch.equal(_out(back), _out(plain))


# -------------------------------------------------------------------------------------- recipe error helper
def test_one_recipe_error_helper():
    from hfquant.app import pipeline, recipe

    assert pipeline.recipe_error is recipe.recipe_error
    assert not hasattr(pipeline, "_fail") and not hasattr(recipe, "_fail")
    for module in (pipeline, recipe):  # every use raises what the helper returns
        src = Path(module.__file__).read_text()
        uses = re.findall(r"(\S+ )?recipe_error\(", src)
        assert uses and all(u in ("raise ", "def ") for u in uses), uses
    err = recipe.recipe_error("model", ValueError("first line\nsecond"))
    assert isinstance(err, recipe.RecipeError) and str(err) == "model: first line"
    assert str(recipe.recipe_error("a.b", KeyError())) == "a.b: KeyError"
    assert str(recipe.recipe_error("a.b", "text\nkept whole")) == "a.b: text\nkept whole"
    with pytest.raises(recipe.RecipeError, match=r"^model: required; give a Hub id"):
        recipe.validate({"output_dir": "x"})


def test_quantize_takes_a_dict_and_refuses_other_configs_and_quantized_models(tiny_models):
    """``quantize_(model, {...})`` raised ``AttributeError: 'dict' object has no attribute 'quant_method'``: a dict of
    ``HFQuantConfig`` fields now works as the config; anything else, and a model that is already quantized (which
    quantizing again would round twice, or keep silently at the old scheme), is one ``ConfigError`` line."""
    from transformers import AutoModelForCausalLM

    from hfquant.core.errors import ConfigError
    from hfquant.nn.weight_only import QuantLinearWeightOnly

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    report = hfquant.quantize_(model, {"method": "rtn", "group_size": 32})
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinearWeightOnly) and report["method"] == "rtn"
    assert model.config.quantization_config.group_size == 32
    with pytest.raises(ConfigError, match=r"already quantized \(quant_method 'hfquant'\)") as again:
        hfquant.quantize_(model, hfquant.HFQuantConfig(method="rtn", bits=8, group_size=32))
    assert "\n" not in str(again.value)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with pytest.raises(ConfigError, match="config must be an HFQuantConfig or a dict of its fields, got int"):
        hfquant.quantize_(fresh, 4)
    with pytest.raises(ConfigError, match=r"HFQuantConfig\.bitz|unknown key"):
        hfquant.quantize_(fresh, {"bitz": 4})
