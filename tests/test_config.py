import json
import logging
import os

import pytest

from ernie_jax import ConfigError, ErnieConfig, get_preset
from ernie_jax.presets import PRESETS, RELEASED

# copies of shared/reference/hf-configs: transformers-written and hub-style config.json of the released models
HF_CONFIGS = os.path.join(os.path.dirname(__file__), "data", "hf_configs")


def _ref(name):
    return os.path.join(HF_CONFIGS, name)


@pytest.mark.parametrize("field, value, needle", [
    ("num_key_value_heads", 3, "not divisible"),
    ("head_dim", 15, "even"),
    ("hidden_size", 0, "positive"),
    ("hidden_act", "swish", "hidden_act"),
    ("dtype", "float64", "dtype"),
    ("remat_policy", "sometimes", "remat_policy"),
    ("attention_impl", "flash", "attention_impl"),
    ("bos_token_id", 10**6, "bos_token_id"),
    ("layer_stack_breaks", (1, 1), "increasing layer indices"),
    ("layer_stack_breaks", (2,), "in (0, num_hidden_layers=2)"),
])
def test_bad_value_names_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=f"ErnieConfig.{field}") as e:
        get_preset("tiny-test", **{field: value})
    assert needle in str(e.value)


def test_moe_fields_validated():
    with pytest.raises(ConfigError, match="moe_k"):
        get_preset("tiny-moe-test", moe_k=9)
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        get_preset("tiny-moe-test", moe_intermediate_size=(16, 8))
    with pytest.raises(ConfigError, match="moe_layer_start_index"):
        get_preset("tiny-moe-test", moe_layer_start_index=3)


def test_replace_unknown_field_and_unknown_preset():
    with pytest.raises(ConfigError, match="no field"):
        get_preset("tiny-test", hiden_size=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("ernie-5")


def test_moe_layer_rule_matches_hf():
    c = get_preset("ernie-4.5-300b-a47b")
    assert [i for i in range(c.num_hidden_layers) if not c.is_moe_layer(i)] == [0, 1, 2]
    c = get_preset("tiny-moe-test", moe_layer_interval=2, num_hidden_layers=6, moe_layer_start_index=0)
    assert [c.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


@pytest.mark.parametrize("name", RELEASED)
def test_released_config_json_matches_preset(name):
    cfg = ErnieConfig.from_hf(_ref(os.path.join(name, "config.json")))
    # transformers drops the MTP depth (it has no MTP); the hub config.json carries it (test below)
    assert cfg == PRESETS[name].replace(num_nextn_predict_layers=0)
    # and back: our config.json reads back to the same config
    assert ErnieConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("name", ["tiny-test", "tiny-moe-test"])
def test_mtp_depth_round_trips_for_dense_and_moe(name):
    cfg = get_preset(name, num_nextn_predict_layers=1)
    assert ErnieConfig.from_hf(cfg.to_hf()).num_nextn_predict_layers == 1


@pytest.mark.parametrize("name", ["ernie-4.5-0.3b", "ernie-4.5-21b-a3b"])
def test_hub_style_config_legacy_rope_theta_and_paddle_keys(name, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = ErnieConfig.from_hf(_ref(f"hub-style-{name}.json"))
    expected = PRESETS[name].replace(use_bias=False)
    assert cfg == expected
    if name.endswith("a3b"):  # moe_capacity / moe_gate / moe_use_aux_free are known Paddle keys: no warning
        assert "ignoring" not in caplog.text


def test_from_hf_errors_name_the_cause(tmp_path):
    d = json.load(open(_ref("ernie-4.5-0.3b/config.json")))
    bad = dict(d)
    del bad["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ErnieConfig.from_hf(bad)
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ErnieConfig.from_hf({**d, "model_type": "llama"})
    with pytest.raises(ConfigError, match="no config.json"):
        ErnieConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ErnieConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ErnieConfig.from_hf({**d, "num_key_value_heads": 5})


def test_unknown_keys_warn(caplog):
    d = json.load(open(_ref("ernie-4.5-0.3b/config.json")))
    with caplog.at_level(logging.WARNING):
        ErnieConfig.from_hf({**d, "some_paddle_flag": True})
    assert "some_paddle_flag" in caplog.text


def test_router_aux_loss_coef_is_passed_over_quietly(caplog):
    """transformers' weight for its own training loss (ours: train.step.LossConfig.aux_coef): a config.json
    carrying it (every released MoE / VL one does) loads without a warning, and exports leave it to
    transformers' default."""
    d = json.load(open(_ref("ernie-4.5-21b-a3b/config.json")))
    vl = json.load(open(_ref("ernie-4.5-vl-28b-a3b/config.json")))
    assert d["router_aux_loss_coef"] == vl["text_config"]["router_aux_loss_coef"] == 0.001
    with caplog.at_level(logging.WARNING):
        cfgs = [ErnieConfig.from_hf({**d, "router_aux_loss_coef": 0.5}), ErnieConfig.from_hf(vl)]
    assert "router_aux_loss_coef" not in caplog.text
    for cfg in cfgs:
        hf = cfg.to_hf()
        assert "router_aux_loss_coef" not in hf.get("text_config", hf)


def test_head_dim_defaults_to_hidden_over_heads_for_moe():
    d = json.load(open(_ref("ernie-4.5-21b-a3b/config.json")))
    assert "head_dim" not in d
    assert ErnieConfig.from_hf(d).head_dim == 2560 // 20


def test_vl_irregular_layer_types_rejected():
    d = json.load(open(_ref("ernie-4.5-vl-28b-a3b/config.json")))
    d["text_config"] = dict(d["text_config"], mlp_layer_types=["dense", "sparse", "dense"] + ["sparse"] * 25)
    with pytest.raises(ConfigError, match="not a start/end/interval pattern"):
        ErnieConfig.from_hf(d)
