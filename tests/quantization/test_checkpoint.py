"""Quantized checkpoints (ernie_jax/quantization/checkpoint.py): a save loads back into the same quantized model
(codes, scales, stack breaks, logits), loading never holds a full-precision copy of a quantized weight, and a
checkpoint whose tensors disagree with its manifest is refused with the tensor named."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.checkpoint.safetensors_io import SafetensorsFile, save_file
from ernie_jax.model import create_model
from ernie_jax.presets import get_preset
from ernie_jax.quantization.checkpoint import QuantizedCheckpointError, load_quantized, save_quantized
from ernie_jax.quantization.model import quantize_model
from ernie_jax.quantization.quantized_weight import QuantizedWeight
from ernie_jax.quantization.scheme import get_scheme

CFG = get_preset("tiny-moe-test", num_hidden_layers=4, num_nextn_predict_layers=1)
SCHEME = get_scheme("wint2", wint2_int4_layers=2)  # splits the MoE stack; 2-bit experts are asymmetric
EXPERTS_WO = "decoder/stacks/2/layers/mlp/experts/wo"


def leaves(m) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(m)))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    q = quantize_model(create_model(CFG, seed=0), SCHEME)
    d = tmp_path_factory.mktemp("q") / "wint2"
    save_quantized(q, d, scheme=SCHEME, extra={"tokenizer": "tok.model"})
    return q, d


def test_a_save_loads_back_the_same_quantized_model(saved):
    q, d = saved
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "quantization.json"]
    loaded = load_quantized(d)
    assert loaded.config == q.config and loaded.config.layer_stack_breaks == (2,)
    a, b = leaves(q), leaves(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids = jax.random.randint(jax.random.key(0), (1, 8), 0, CFG.vocab_size)
    np.testing.assert_array_equal(np.asarray(loaded(ids).logits), np.asarray(q(ids).logits))
    manifest = json.loads((d / "quantization.json").read_text())
    assert manifest["scheme"]["name"] == "wint2" and manifest["extra"]["tokenizer"] == "tok.model"
    assert manifest["tensors"][EXPERTS_WO]["bits"] == 2 and not manifest["tensors"][EXPERTS_WO]["symmetric"]


def test_the_file_holds_codes_not_full_precision_weights(saved):
    _, d = saved
    f = SafetensorsFile(d / "model.safetensors")
    assert f.get(f"{EXPERTS_WO}/codes").dtype == np.uint8
    assert f.shape(f"{EXPERTS_WO}/codes") == (2, 8, 16 * 2 // 8, 32)  # [layers, E, K * bits / 8, N]
    assert EXPERTS_WO not in f.keys()
    loaded = load_quantized(d)
    w = loaded.decoder.stacks[2].layers.mlp.experts.wo[...]
    assert isinstance(w, QuantizedWeight) and w.qt.codes.dtype == np.uint8


def _rewrite(src, dst, change):
    """A copy of checkpoint `src` in `dst` with its tensors passed through change(dict)."""
    os.makedirs(dst)
    for n in ("config.json", "quantization.json"):
        (dst / n).write_text((src / n).read_text())
    f = SafetensorsFile(src / "model.safetensors")
    tensors = {k: f.get(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_mismatched_tensors_are_refused_naming_them(saved, tmp_path):
    _, d = saved

    def bad_scales(t):
        t[f"{EXPERTS_WO}/scales"] = t[f"{EXPERTS_WO}/scales"][..., :16]

    _rewrite(d, tmp_path / "scales", bad_scales)
    with pytest.raises(QuantizedCheckpointError, match=rf"{EXPERTS_WO}: scales of a stack \[2, 8\] of \[16, 32\] "
                                                       r"2-bit weight with group_size=16 must be \(2, 8, 1, 32\), "
                                                       r"got \(2, 8, 1, 16\)"):
        load_quantized(tmp_path / "scales")
    _rewrite(d, tmp_path / "missing", lambda t: t.pop(f"{EXPERTS_WO}/zeros"))
    with pytest.raises(QuantizedCheckpointError, match=rf"missing \['{EXPERTS_WO}/zeros'\]"):
        load_quantized(tmp_path / "missing")
    with pytest.raises(QuantizedCheckpointError, match="no quantization.json"):
        load_quantized(tmp_path)


def test_a_quantized_model_is_not_exported_as_a_transformers_directory(saved, tmp_path):
    q, _ = saved
    with pytest.raises(ValueError, match=r"parameter decoder/stacks/0/layers/attn/wq is quantized \(QuantizedWeight\)"
                                         r": a quantized model is written with .*save_quantized"):
        ernie_jax.save_pretrained(q, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
