"""ernie_jax.experiment.data_kinds: the registry's lookups, and `check_data_fits_model`, which refuses at start a
model that cannot take its data."""

import dataclasses
import importlib.util
import os

import pytest

import ernie_jax
from ernie_jax.experiment import ExperimentConfigError, check_data_fits_model, get_kind, load_experiment
from ernie_jax.synthetic.text import default_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny():
    spec = importlib.util.spec_from_file_location("_tiny_config", os.path.join(ROOT, "experiments", "configs",
                                                                                "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_get_kind_names_where_and_the_registered_kinds():
    assert get_kind("text").name == "text" and get_kind("vqa").name == "vqa"
    with pytest.raises(ExperimentConfigError, match=r"^config.x: unknown kind 'y'; registered: \['chat', 'preference', 'text', 'vqa'\]"):
        get_kind("y", "config.x")


@pytest.mark.parametrize("overrides, match", [
    (dict(model="tiny-moe-test"), r"token ids reach 511 \(the tokenizer .*tokenizer.model has 512 pieces\) but the "
                                  r"model's vocab_size is 128"),
    (dict(model_overrides={"max_position_embeddings": 64}),
     "seq_len=128 exceeds the model's max_position_embeddings=64"),
])
def test_a_model_that_cannot_take_its_data_is_refused_at_start(overrides, match):
    """Before: `tiny.py` with `model=tiny-moe-test` (vocab 128, tokenizer 512) aborted after 5 NaN steps."""
    c = _tiny()
    for k, v in overrides.items():
        c[k] = v if not isinstance(v, dict) else {**c[k].to_dict(), **v}
    with pytest.raises(ExperimentConfigError, match=match):
        load_experiment(c)


def test_pad_id_and_vl_special_ids_must_fit_the_model():
    model = ernie_jax.get_preset("tiny-vl")
    data = default_data_config("train", vocab_size=model.vocab_size)
    check_data_fits_model(model, data)
    with pytest.raises(ExperimentConfigError, match=rf"config.data.pad_id={model.vocab_size} is outside"):
        check_data_fits_model(model, data.replace(pad_id=model.vocab_size))

    # VL data: the six special ids of the data config must be the model's
    from ernie_jax.data import MultimodalDataConfig
    vl = MultimodalDataConfig.from_model_config(model, sources=[{"path": "unused.jsonl"}], seq_len=64, tokenizer=data.tokenizer,
                                                global_batch_size=2)
    check_data_fits_model(model, vl)
    off = dataclasses.replace(vl, special=dataclasses.replace(vl.special, image_token_id=model.vocab_size + 7))
    with pytest.raises(ExperimentConfigError, match=rf"config.data.special.image_token_id={model.vocab_size + 7} "
                                                    rf"but the model's is {model.image_token_id}"):
        check_data_fits_model(model, off)
