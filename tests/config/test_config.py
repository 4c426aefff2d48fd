import copy
import json

import pytest

from hfquant import HFQuantConfig
from hfquant.core.errors import ConfigError
from helpers import tiny_tokenizer


def test_defaults_are_gptq_w4_g128_sym():
    c = HFQuantConfig()
    assert (c.method, c.bits, c.group_size, c.sym) == ("gptq", 4, 128, True)
    assert c.quant_method == "hfquant"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(bitz=4)
    msg = str(e.value)
    assert "bitz" in msg and "group_size" in msg and "\n" not in msg


@pytest.mark.parametrize("field,value", [
    ("bits", 5), ("bits", "4"), ("bits", True), ("group_size", 0), ("group_size", -2), ("method", "awq"),
    ("sym", "yes"), ("damp_percent", -0.1), ("damp_percent", 2), ("num_samples", 0), ("seq_len", -1),
    ("block_size", 0), ("observer", "max"), ("seed", -1), ("dataset", 3), ("modules_to_not_convert", "lm_head"),
    ("calibration_batch_size", 0), ("dataset_split", 1), ("lm_head_bits", 4), ("lm_head_bits", True),
    ("seed", 2**64), ("seed", 1.5), ("tokenizer", 123), ("tokenizer", ""), ("tokenizer", object()),
])
def test_bad_values_are_rejected_with_the_field_name(field, value):
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(**{field: value})
    assert field in str(e.value) and "expected" in str(e.value)


@pytest.mark.parametrize("kw", [dict(method="smoothquant"), dict(save_format="gptq"),
                                dict(save_format="compressed-tensors"), dict(bits="auto", target_avg_bits=3.5)])
def test_an_8bit_head_needs_a_w4a16_method_with_fixed_bits_and_the_hfquant_format(kw):
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(lm_head_bits=8, **kw)
    msg = str(e.value)
    assert "lm_head_bits" in msg and "expected" in msg and "\n" not in msg
    assert HFQuantConfig(lm_head_bits=8, method="rtn").lm_head_bits == 8


def test_round_trip_and_runtime_objects_stay_out():
    c = HFQuantConfig(method="rtn", bits=3, group_size=64, sym=False, dataset=["a text", "another"],
                      tokenizer=tiny_tokenizer(), modules_to_not_convert=["lm_head"])
    d = c.to_dict()
    json.dumps(d)  # serializable
    assert d["dataset"] is None and d["tokenizer"] is None
    back = HFQuantConfig.from_dict(d)
    assert back.to_dict() == d
    assert HFQuantConfig.from_dict(HFQuantConfig(dataset="data.txt").to_dict()).dataset == "data.txt"


def test_diff_dict_has_only_changes():
    assert HFQuantConfig(bits=3).to_diff_dict() == {"quant_method": "hfquant", "bits": 3}


def test_transformers_round_trip_through_auto_config():
    from transformers.quantizers.auto import AutoQuantizationConfig

    c = AutoQuantizationConfig.from_dict({"quant_method": "hfquant", "bits": 8, "group_size": -1})
    assert isinstance(c, HFQuantConfig) and c.bits == 8


@pytest.mark.parametrize("kw,field", [(dict(method="smoothquant", bits=4), "bits"),
                                      (dict(method="smoothquant", group_size=64), "group_size"),
                                      (dict(method="rtn", desc_act=False), "desc_act"),
                                      (dict(method="rtn", damp_percent=0.1), "damp_percent"),
                                      (dict(method="gptq", alpha=0.5), "alpha"),
                                      (dict(method="rtn", weight_method="gptq"), "weight_method")])
def test_a_field_the_method_does_not_use_is_refused_not_ignored(kw, field):
    """``HFQuantConfig(method="smoothquant", bits=4)`` used to be accepted and the bits ignored (SmoothQuant's weights
    are int8): a field only other methods read is refused in one line naming the methods that use it. A saved config
    (every field, unread ones at their defaults) still loads."""
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(**kw)
    msg = str(e.value)
    assert msg.startswith(f"HFQuantConfig.{field}: ") and f"does not use {field}" in msg and "\n" not in msg
    for method in ("gptq", "rtn", "smoothquant"):
        saved = HFQuantConfig(method=method).to_dict()
        assert HFQuantConfig.from_dict(saved).to_dict() == saved


# ------------------------------------------------------------------------------------------------------ sections
def test_sections_given_as_objects_or_mappings_equal_the_flat_fields():
    from hfquant.config import CalibrationArgs, GGUFArgs, GPTQArgs, MixedArgs

    flat = HFQuantConfig(bits=3, sym=False, num_samples=8, calibration_batch_size=2, dataset_split="validation")
    for calibration in (CalibrationArgs(num_samples=8, batch_size=2, split="validation"),
                        {"num_samples": 8, "batch_size": 2, "split": "validation"}):
        for gptq in (GPTQArgs(bits=3, sym=False), {"bits": 3, "sym": False}):
            c = HFQuantConfig(gptq=gptq, calibration=calibration)
            assert c == flat and c.to_json_string(use_diff=False) == flat.to_json_string(use_diff=False)
            assert list(c.to_dict()) == list(flat.to_dict())
            assert c._given == flat._given
    mixed = HFQuantConfig(method="rtn", gguf=GGUFArgs(type="Q4_K"), mixed=MixedArgs(overrides={"*.q_proj": {"skip": True}}))
    assert mixed == HFQuantConfig(method="rtn", gguf_type="Q4_K", overrides={"*.q_proj": {"skip": True}})
    sq = HFQuantConfig(method="smoothquant", smoothquant={"alpha": 0.5, "weight_method": "gptq"}, gptq={"damp_percent": 0.1})
    assert sq == HFQuantConfig(method="smoothquant", alpha=0.5, weight_method="gptq", damp_percent=0.1)
    assert HFQuantConfig.from_dict(sq.to_dict()) == sq


def test_a_section_object_counts_the_fields_it_was_given():
    """``quality``, ``gguf_type`` and the method rule depend on which fields were chosen, as with flat fields."""
    from hfquant.config import GGUFArgs, GPTQArgs

    assert HFQuantConfig(quality="best", gptq=GPTQArgs(gptaq=False)).gptaq is False
    assert HFQuantConfig(quality="best", gptq=GPTQArgs(bits=3)).gptaq is True
    with pytest.raises(ConfigError, match=r"^HFQuantConfig\.group_size: got 128, but gguf_type 'Q4_K'"):
        HFQuantConfig(gguf=GGUFArgs(type="Q4_K"), gptq=GPTQArgs(group_size=128))
    with pytest.raises(ConfigError, match=r"^HFQuantConfig\.desc_act: .* does not use desc_act"):
        HFQuantConfig(method="rtn", gptq=GPTQArgs(bits=3, desc_act=False))
    assert HFQuantConfig(method="rtn", gptq=GPTQArgs(bits=3)).bits == 3
    edited = GPTQArgs()
    edited.bits = 2  # set after construction: still given
    assert HFQuantConfig(gptq=edited).bits == 2


@pytest.mark.parametrize("kw,flat", [(dict(bits=3, gptq={"bits": 4}), "bits"),
                                     (dict(gguf_type="Q4_K", gguf={"type": "Q4_K"}), "gguf_type"),
                                     (dict(calibration_batch_size=2, calibration={"batch_size": 2}), "calibration_batch_size")])
def test_a_field_given_flat_and_in_its_section_is_refused(kw, flat):
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(**kw)
    msg = str(e.value)
    assert msg.startswith(f"HFQuantConfig.{flat}: given twice") and "\n" not in msg


@pytest.mark.parametrize("kw,start", [(dict(gptq={"bitz": 3}), "HFQuantConfig.gptq: unknown key(s) ['bitz']"),
                                      (dict(gptq=3), "HFQuantConfig.gptq: got 3; expected a GPTQArgs"),
                                      (dict(gptq={"bits": 5}), "HFQuantConfig.bits: got 5; expected one of")])
def test_bad_sections_are_refused_in_one_line(kw, start):
    with pytest.raises(ConfigError) as e:
        HFQuantConfig(**kw)
    assert str(e.value).startswith(start) and "\n" not in str(e.value)


@pytest.mark.parametrize("section,kw,flat", [
    ("GPTQArgs", {"bits": 5}, {"bits": 5}), ("SmoothQuantArgs", {"alpha": 2}, {"method": "smoothquant", "alpha": 2}),
    ("CalibrationArgs", {"batch_size": 0}, {"calibration_batch_size": 0}),
    ("GGUFArgs", {"type": "Q9"}, {"gguf_type": "Q9"}), ("MixedArgs", {"fisher_windows": -1}, {"fisher_windows": -1}),
])
def test_each_section_checks_itself_with_the_flat_message(section, kw, flat):
    import hfquant.config

    with pytest.raises(ConfigError) as own:
        getattr(hfquant.config, section)(**kw)
    with pytest.raises(ConfigError) as whole:
        HFQuantConfig(**flat)
    assert str(own.value) == str(whole.value)
    assert str(own.value).startswith(f"HFQuantConfig.{list(flat)[-1]}: got ")


def test_flat_attributes_read_and_write_the_sections():
    c = HFQuantConfig(method="rtn", gguf_type="Q4_K")
    assert (c.bits, c.gguf_type, c.calibration_batch_size) == (c.gptq.bits, c.gguf.type, c.calibration.batch_size)
    c.gguf_type = "Q6_K"
    c.module_schemes = {"a": {"bits": 4, "group_size": 128, "sym": True, "method": "rtn"}}
    c.calibration_batch_size = 2
    c.checkpoint_format = "gptq"
    assert (c.gguf.type, c.calibration.batch_size, c.checkpoint_format) == ("Q6_K", 2, "gptq")
    assert c.mixed.module_schemes == c.module_schemes and c.to_dict()["gguf_type"] == "Q6_K"
    for name in ("gguf_type", "module_schemes", "calibration_batch_size", "bits"):
        assert name not in vars(c)  # held once, in its section
    assert not hasattr(c, "get_loading_attributes") and not hasattr(c, "type")
    c = HFQuantConfig(bits=3)
    assert c.update(bits=8, nope=1) == {"nope": 1} and c.gptq.bits == 8  # transformers' update
    shallow, deep = copy.copy(c), copy.deepcopy(c)
    shallow.bits, deep.calibration_batch_size = 2, 4
    assert (c.bits, c.calibration_batch_size, deep.bits) == (8, 8, 8) and deep != c
    assert deep == HFQuantConfig.from_dict(deep.to_dict()) == HFQuantConfig(bits=8, calibration_batch_size=4)


def test_the_field_table_has_small_sections_and_states_the_methods_once():
    import dataclasses

    from hfquant.config import DEFAULTS, FIELDS, GGUF_FIELDS, METHOD_FIELDS, SECTIONS

    top = dataclasses.fields(HFQuantConfig)
    assert len(top) <= 12
    assert {n: len(dataclasses.fields(s)) for n, s in SECTIONS.items()} == {
        "gptq": 13, "calibration": 11, "smoothquant": 3, "mixed": 7, "gguf": 3}
    assert [f.name for f in dataclasses.fields(SECTIONS["calibration"])] == [
        "dataset", "config", "split", "column", "num_samples", "seq_len", "seed", "batch_size", "tokenizer",
        "expert_tokens", "expert_min_tokens"]
    assert len(FIELDS) == len(DEFAULTS) == 42 and list(DEFAULTS) == [s.flat for s in FIELDS]
    assert GGUF_FIELDS == ("gguf_type", "gguf_head_type", "gguf_embedding_type")
    for spec in FIELDS:
        assert {m for m, fields in METHOD_FIELDS.items() if spec.flat in fields} == set(spec.methods)
    assert METHOD_FIELDS["smoothquant"] == ("alpha", "weight_method", "activation_scheme", "damp_percent",
                                            "block_size", "modules_to_not_convert", "overrides")
