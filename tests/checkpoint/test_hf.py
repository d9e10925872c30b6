"""Parity with transformers: their model -> our loader, and our saver -> their loader (fp32, eager)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import ernie_jax
from ernie_jax import CheckpointError, ErnieConfig, get_preset
from ernie_jax.sharding import MeshConfig, make_mesh
from random_weights import random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

CONFIGS = {
    # the quirks of the released models and more: head_dim != hidden/heads, MQA, biases, untied head
    "mqa_bias_untied": get_preset("tiny-test", num_key_value_heads=1, use_bias=True, tie_word_embeddings=False),
    # GQA, tied head, released-style (no bias), large theta
    "gqa_tied": get_preset("tiny-test", num_hidden_layers=3, rope_theta=500000.0),
    "gelu_mha": get_preset("tiny-test", num_key_value_heads=4, hidden_act="gelu", head_dim=8),
}


def _randomise(hf_model, seed):
    """Random weights everywhere (norm scales too), so a swapped or transposed tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(1.0 + noise if "norm" in name else noise)
    return hf_model


def _hf_model(cfg: ErnieConfig, seed=0):
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager",
                                                          dtype=torch.float32)
    return _randomise(model.eval(), seed)


def _ids(b=2, s=11, vocab=128, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (b, s))


def _hf_logits(model, ids, **kw):
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def _our_logits(model, ids, **kw):
    g, st = nnx.split(model)
    return np.asarray(jax.jit(lambda st, ids: nnx.merge(g, st)(ids, **kw).logits)(st, jnp.asarray(ids)))


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_to_ours(name, tmp_path):
    cfg = CONFIGS[name]
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = ernie_jax.from_pretrained(tmp_path, dtype="float32")
    assert ours.config == cfg
    ids = _ids()
    diff = np.abs(_our_logits(ours, ids) - _hf_logits(hf, ids)).max()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    ours = random_model(cfg, seed=4)  # every value random: norm scales not all ones, biases not all zeros
    ernie_jax.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Ernie4_5ForCausalLM"
    ids = _ids(seed=1)
    diff = np.abs(_our_logits(ours, ids) - _hf_logits(hf, ids)).max()
    assert diff <= 1e-5, diff


def test_padding_mask_parity(tmp_path):
    hf = _hf_model(CONFIGS["gqa_tied"])
    hf.save_pretrained(tmp_path)
    ours = ernie_jax.from_pretrained(tmp_path)
    ids = _ids()
    am = np.ones_like(ids)
    am[0, 8:] = 0  # right padding
    ref = _hf_logits(hf, ids, attention_mask=torch.tensor(am))
    out = _our_logits(ours, ids, attention_mask=jnp.asarray(am))
    assert np.abs(out[am == 1] - ref[am == 1]).max() <= 1e-5


def test_load_sharded_on_a_mesh_and_multi_file_checkpoint(tmp_path):
    cfg = CONFIGS["mqa_bias_untied"]
    hf = _hf_model(cfg, seed=3)
    ids = _ids(b=8)
    ref = _hf_logits(hf, ids)
    hf.save_pretrained(tmp_path / "hf")  # re-save through our writer in several files to exercise the index
    ernie_jax.save_pretrained(ernie_jax.from_pretrained(tmp_path / "hf"), tmp_path / "multi", max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "multi" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    ours = ernie_jax.from_pretrained(tmp_path / "multi", mesh=mesh, rules="fsdp_tensor")
    assert ours.decoder.stacks[0].layers.attn.wq[...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None)
    assert np.abs(_our_logits(ours, ids) - ref).max() <= 1e-5


def test_bf16_checkpoint(tmp_path):
    cfg = CONFIGS["gqa_tied"]
    hf = _hf_model(cfg).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    theirs = load_file(tmp_path / "model.safetensors")
    assert theirs["model.embed_tokens.weight"].dtype.name == "bfloat16"
    ours = ernie_jax.from_pretrained(tmp_path, dtype="float32")  # bf16 weights upcast exactly
    # (hf.float() would not do: .to(bfloat16) also rounded the rotary inv_freq buffer)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    ids = _ids()
    assert np.abs(_our_logits(ours, ids) - _hf_logits(hf32, ids)).max() <= 1e-5
    ours16 = ernie_jax.from_pretrained(tmp_path, dtype="bfloat16")
    assert ours16.embed[...].dtype == jnp.bfloat16
    ernie_jax.save_pretrained(ours16, tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert set(again) == set(theirs)
    for k, v in theirs.items():  # bf16 in, bf16 out: bit for bit
        assert again[k].dtype == v.dtype, k
        np.testing.assert_array_equal(again[k].view(np.uint16), v.view(np.uint16), err_msg=k)
    assert json.load(open(tmp_path / "again" / "config.json"))["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture()
def saved(tmp_path):
    cfg = CONFIGS["mqa_bias_untied"]
    ernie_jax.save_pretrained(random_model(cfg), tmp_path)
    return tmp_path


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['model.layers.1.self_attn.k_proj.bias'\]"):
        ernie_jax.from_pretrained(saved)


def test_unexpected_key_is_named(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): \['model.layers.0.mlp.extra.weight'\]"):
        ernie_jax.from_pretrained(saved)


def test_shape_mismatch_names_key_and_both_shapes(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((40, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight': checkpoint has \(40, 32\), "
                                              r"the config implies \(48, 32\)"):
        ernie_jax.from_pretrained(saved)


def test_mtp_keys_are_ignored_like_transformers(saved, caplog):
    _rewrite(saved, lambda t: t.update({"model.mtp_emb_norm.0.weight": np.ones(32, np.float32)}))
    ernie_jax.from_pretrained(saved)
    assert "mtp_emb_norm" in caplog.text


def test_truncated_file_and_missing_weights(saved, tmp_path):
    p = saved / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        ernie_jax.from_pretrained(saved)
    os.remove(p)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ernie_jax.from_pretrained(saved)


def test_failed_save_leaves_the_old_checkpoint(saved, monkeypatch):
    before = {n: (saved / n).read_bytes() for n in os.listdir(saved)}
    import ernie_jax.checkpoint.hf as hf_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ernie_jax.save_pretrained(random_model(CONFIGS["mqa_bias_untied"], seed=9), saved)
    assert {n: (saved / n).read_bytes() for n in os.listdir(saved)} == before
    assert not [n for n in os.listdir(saved.parent) if n.startswith(".ernie_jax_save_")]
