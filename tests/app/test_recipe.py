"""Recipe schema: shipped recipes, defaults, --set, the mapping onto HFQuantConfig, round trip."""

from pathlib import Path

import pytest
import yaml

from hfquant.app import recipe
from hfquant.config import DEFAULTS
from hfquant.core.errors import ConfigError

ROOT = Path(__file__).parent.parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _load_shipped(path: Path, stand_in: Path) -> tuple[dict, dict]:
    """(raw YAML, resolved recipe) of a shipped recipe, read from the repository root (recipes use paths relative
    to it).

    A model under ``models/`` (git-ignored; scripts/prepare_reference_model.py builds it) that is not built here is
    the only thing that cannot be checked without it: the rest of the recipe is then validated with ``model``
    pointed at a stand-in folder, so every section of every recipe is checked on every machine."""
    raw = yaml.safe_load(path.read_text())
    sets = []
    if Path(raw["model"]).parts[0] == "models" and not (ROOT / raw["model"] / "config.json").is_file():
        sets = [f"model={stand_in}"]
    return raw, recipe.load(path, sets)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path, monkeypatch, tiny_models):
    monkeypatch.chdir(ROOT)
    raw, r = _load_shipped(path, tiny_models["llama"])
    assert r["model"] in (raw["model"], str(tiny_models["llama"]))
    if Path(raw["model"]).parts[0] != "models":
        assert r["model"] == raw["model"] and not recipe.looks_local(raw["model"])  # a Hub id, never a folder
    cfg = recipe.to_config(r)
    assert cfg.method == raw.get("quantization", {}).get("method", "gptq") == r["quantization"]["method"]
    assert r["hub"]["repo_id"] is None, f"{path.name}: shipped recipes must not push anywhere by default"
    assert r["trust_remote_code"] is False
    assert r["output_dir"] == raw["output_dir"] and r["output_dir"].startswith("out/")


def test_shipped_recipes_cover_the_offline_and_hub_runs(monkeypatch, tiny_models):
    monkeypatch.chdir(ROOT)
    assert len(RECIPES) >= 6
    names = set()
    for path in RECIPES:
        raw, r = _load_shipped(path, tiny_models["llama"])
        names.add((str(Path(raw["model"])), recipe.to_config(r).method))
    assert {("models/smollm2-135m", "gptq"), ("models/smollm2-135m", "smoothquant"),
            ("meta-llama/Meta-Llama-3-8B", "gptq"), ("Qwen/Qwen2.5-7B", "gptq"),
            ("mistralai/Mistral-7B-v0.3", "gptq")} <= names


def test_offline_default_is_gptq_w4_g128_on_bundled_wikitext(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent.parent)
    raw = yaml.safe_load(Path("recipes/smollm2-135m-gptq-w4a16-g128.yaml").read_text())
    assert raw["model"] == "models/smollm2-135m"
    q = raw["quantization"]
    assert (q["method"], q["bits"], q["group_size"]) == ("gptq", 4, 128)
    assert raw["calibration"]["dataset"] is None and raw["evaluation"].get("dataset") is None


def _tiny(tmp_path, tiny_models, **extra):
    return {"model": str(tiny_models["llama"]), "output_dir": str(tmp_path / "o"), **extra}


def test_defaults_are_filled_and_map_onto_hfquantconfig(tmp_path, tiny_models):
    r = recipe.validate(_tiny(tmp_path, tiny_models, calibration={"split": "validation", "batch_size": 2, "config": "c"}))
    cfg = recipe.to_config(r)
    assert (cfg.dataset_split, cfg.calibration_batch_size, cfg.dataset_config) == ("validation", 2, "c")
    for key in recipe.METHOD_FIELDS["gptq"]:
        assert r["quantization"][key] == DEFAULTS[key] == getattr(cfg, key)
    assert r["evaluation"] == recipe.EVALUATION_DEFAULTS and r["hub"] == recipe.HUB_DEFAULTS
    # every calibration key reaches a distinct HFQuantConfig field
    assert len(set(recipe.CALIBRATION_FIELDS.values())) == len(recipe.CALIBRATION_FIELDS)
    assert set(recipe.CALIBRATION_FIELDS.values()) <= set(DEFAULTS)


def test_an_8bit_head_reaches_the_config(tmp_path, tiny_models):
    r = recipe.validate(_tiny(tmp_path, tiny_models, quantization={"method": "rtn", "lm_head_bits": 8}))
    assert recipe.to_config(r).lm_head_bits == 8


def test_smoothquant_section_keeps_only_its_fields(tmp_path, tiny_models):
    r = recipe.validate(_tiny(tmp_path, tiny_models, quantization={"method": "smoothquant", "alpha": 0.5}))
    assert set(r["quantization"]) == {"method", *recipe.METHOD_FIELDS["smoothquant"]}
    assert recipe.to_config(r).alpha == 0.5


def test_set_overrides_and_dump_round_trip(tmp_path, tiny_models):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_tiny(tmp_path, tiny_models)))
    r = recipe.load(path, ["quantization.bits=3", "quantization.sym=false", "calibration.dataset=null",
                           "evaluation.max_tokens=1024", "hub.repo_id=me/model"], output=str(tmp_path / "x"))
    assert (r["quantization"]["bits"], r["quantization"]["sym"], r["output_dir"]) == (3, False, str(tmp_path / "x"))
    assert r["evaluation"]["max_tokens"] == 1024 and r["hub"]["repo_id"] == "me/model"
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(recipe.dump(r))
    assert recipe.load(dumped) == r


@pytest.mark.parametrize("raw,path", [
    ({"quantization": {"group_size": 0}}, "quantization.group_size"),
    ({"calibration": {"seed": -1}}, "calibration.seed"),
    ({"calibration": {"tokenizer": 3}}, "calibration.tokenizer"),
    ({"evaluation": {"before": "yes"}}, "evaluation.before"),
    ({"hub": {"repo_id": "no-slash"}}, "hub.repo_id"),
    ({"hub": {"private": "no"}}, "hub.private"),
    ({"hub": {"weird": 1}}, "hub.weird"),
    ({"output_dir": 7}, "output_dir"),
    ({"quantization": {"lm_head_bits": 4}}, "quantization.lm_head_bits"),
    ({"quantization": {"method": "smoothquant", "lm_head_bits": 8}}, "quantization.lm_head_bits"),
])
def test_errors_start_with_the_key_path(tmp_path, tiny_models, raw, path):
    with pytest.raises(ConfigError) as e:
        recipe.validate({**_tiny(tmp_path, tiny_models), **raw})
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_hub_ids_are_not_checked_on_disk(tmp_path):
    r = recipe.validate({"model": "org/some-model", "output_dir": str(tmp_path / "o")})
    assert r["model"] == "org/some-model"
    assert recipe.looks_local("./org/some-model") and recipe.looks_local("/abs/path") and not recipe.looks_local("org/m")


def test_quantization_keys_may_be_grouped_by_section(tmp_path, tiny_models):
    """``gptq:``, ``gguf:``, ``mixed:``, ``smoothquant:`` mappings with the sections' field names resolve to the same
    flat recipe as the flat keys; a key given both ways, or a section key the method does not read, is refused."""
    flat = recipe.validate(_tiny(tmp_path, tiny_models, quantization={
        "method": "rtn", "bits": 8, "gguf_head_type": "Q8_0", "overrides": {"*.q_proj": {"skip": True}}}))
    nested = recipe.validate(_tiny(tmp_path, tiny_models, quantization={
        "method": "rtn", "gptq": {"bits": 8}, "gguf": {"head_type": "Q8_0"}, "mixed": {"overrides": {"*.q_proj": {"skip": True}}}}))
    assert nested == flat and list(nested["quantization"]) == list(flat["quantization"])
    assert recipe.to_config(nested) == recipe.to_config(flat)
    sq = recipe.validate(_tiny(tmp_path, tiny_models, quantization={
        "method": "smoothquant", "smoothquant": {"alpha": 0.5}, "gptq": {"damp_percent": 0.1}}))
    assert (sq["quantization"]["alpha"], sq["quantization"]["damp_percent"]) == (0.5, 0.1)
    for q, start in [({"bits": 3, "gptq": {"bits": 4}}, "quantization.gptq.bits: also given as quantization.bits"),
                     ({"method": "rtn", "gptq": {"desc_act": False}}, "quantization.gptq.desc_act: unknown key"),
                     ({"method": "smoothquant", "gguf": {"type": "Q4_K"}}, "quantization.gguf: unknown key"),
                     ({"gptq": {"bits": 5}}, "quantization.gptq.bits: got 5; expected"),
                     ({"gptq": [4]}, "quantization.gptq: must be a mapping"),
                     ({"mixed": {"target_avg_bits": 3.5}}, "quantization.mixed.target_avg_bits: got 3.5; expected null"),
                     ({"mixed": {"overrides": {"a": 1}}}, "quantization.mixed.overrides['a']: got 1")]:
        with pytest.raises(ConfigError) as e:
            recipe.validate(_tiny(tmp_path, tiny_models, quantization=q))
        assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def test_calibration_keys_are_the_calibration_section_fields():
    import dataclasses

    from hfquant.config import CalibrationArgs

    assert list(recipe.CALIBRATION_FIELDS) == [f.name for f in dataclasses.fields(CalibrationArgs)]
    assert recipe.CALIBRATION_FIELDS["batch_size"] == "calibration_batch_size"


@pytest.mark.parametrize("evaluation, message", [
    ({"tasks": "alice_next"}, "evaluation.tasks: must be a list of lm-eval task names, e.g. [alice_next, hellaswag], "
                              "got 'alice_next'"),
    ({"tasks": ["alice_next", 3]}, "evaluation.tasks: must be a list of lm-eval task names"),
    ({"tasks": ["alice next"]}, "evaluation.tasks: must be a list of lm-eval task names"),
    ({"tasks": ["alice_next", "alice_next"]}, "evaluation.tasks: names a task twice"),
    ({"tasks": ["alice_next"], "before": False, "after": False}, "evaluation.tasks: no model would be evaluated"),
    ({"task_limit": 0}, "evaluation.task_limit: must be an integer >= 1 or null, got 0"),
    ({"task_limit": True}, "evaluation.task_limit: must be an integer >= 1 or null, got True"),
    ({"num_fewshot": -1}, "evaluation.num_fewshot: must be an integer >= 0 or null, got -1"),
    ({"task_batch_size": None}, "evaluation.task_batch_size: must be an integer >= 1, got None"),
    ({"task": ["alice_next"]}, "evaluation.task: unknown key"),
])
def test_bad_task_settings_fail_in_one_line(tmp_path, tiny_models, evaluation, message):
    with pytest.raises(ConfigError) as e:
        recipe.validate(_tiny(tmp_path, tiny_models, evaluation=evaluation))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_tasks_default_to_none_and_resolve_with_their_settings(tmp_path, tiny_models):
    assert recipe.validate(_tiny(tmp_path, tiny_models))["evaluation"]["tasks"] == []
    ev = recipe.validate(_tiny(tmp_path, tiny_models, evaluation={"tasks": ["alice_next", "hellaswag"], "after": False,
                                                                  "task_limit": 50, "num_fewshot": 0}))["evaluation"]
    assert (ev["tasks"], ev["task_limit"], ev["num_fewshot"], ev["task_batch_size"]) == (
        ["alice_next", "hellaswag"], 50, 0, 8)
    assert recipe.validate(_tiny(tmp_path, tiny_models, evaluation={"tasks": None}))["evaluation"]["tasks"] == []
