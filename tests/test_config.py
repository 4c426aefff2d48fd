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
