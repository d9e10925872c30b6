"""MoE parity with transformers' `Ernie4_5_MoeForCausalLM` (fp32, eager attention and experts), both ways.

Random weights everywhere, including a correction bias large enough to change the routing (asserted): with
the zero bias transformers initialises, a swapped bias / probability in the router could never show.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import ernie_jax
from ernie_jax import get_preset
from ernie_jax.model.router import RouterBias

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

CONFIGS = {
    # layers [dense x3, moe, dense, moe]: four scanned stacks; two shared experts, untied head
    "shared2_untied": get_preset("tiny-moe-test", num_hidden_layers=6, moe_layer_start_index=2,
                                 moe_layer_interval=2, moe_layer_end_index=5, moe_num_shared_experts=2,
                                 tie_word_embeddings=False),
    # layers [dense x3, moe, dense]; no shared expert; biases everywhere (the MoE lm_head has one too), tied
    "noshared_bias_tied": get_preset("tiny-moe-test", num_hidden_layers=5, moe_layer_start_index=2,
                                     moe_layer_interval=2, moe_layer_end_index=4, moe_num_shared_experts=0,
                                     use_bias=True),
}
HF_KW = dict(attn_implementation="eager", experts_implementation="eager")
BIAS_STD = 0.1  # correction-bias scale: comparable to the spread of 8 router probabilities


def _ids(b=2, s=11, seed=0):
    return np.random.RandomState(seed).randint(0, 128, (b, s))


@functools.partial(jax.jit, static_argnums=0)
def _fwd(g, st, ids):  # one compile per graphdef (config), shared by every model of that config
    return nnx.merge(g, st)(ids).logits


def _our_logits(model, ids):
    return np.asarray(_fwd(*nnx.split(model), jnp.asarray(ids)))


def _hf_run(model, ids):
    with torch.no_grad():
        out = model(torch.tensor(ids), output_router_logits=True)
    return out.logits.numpy(), [z.numpy() for z in out.router_logits]


def _assert_bias_changes_routing(router_logits, biases, k):
    """Top-k of softmax + bias differs from plain top-k for some token of every MoE layer."""
    assert len(router_logits) == len(biases)
    for z, b in zip(router_logits, biases):
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        plain = np.sort(np.argsort(-p, -1)[:, :k], -1)
        biased = np.sort(np.argsort(-(p + b.reshape(-1)), -1)[:, :k], -1)
        assert (plain != biased).any(1).sum() >= 2, "the correction bias never changes the routing"


def _randomise_hf(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            scale = BIAS_STD if "e_score_correction_bias" in name else 0.1
            p.copy_(1.0 + 0.1 * noise if "norm" in name else scale * noise)
    return model


def _random_ours(cfg, seed):
    """Our model with random values (norm scales ~1, correction bias ~BIAS_STD, the rest ~N(0, 0.1))."""
    r = np.random.RandomState(seed)
    g, st = nnx.split(ernie_jax.abstract_model(cfg))
    flat = []
    for path, v in nnx.to_flat_state(st):
        noise = r.randn(*v.get_value().shape)
        val = 1 + 0.1 * noise if path[-1] == "scale" else (BIAS_STD if isinstance(v, RouterBias) else 0.1) * noise
        flat.append((path, v.replace(jnp.asarray(val, v.get_value().dtype))))
    return nnx.merge(g, nnx.from_flat_state(flat))


_CKPTS = {}


def _hf_checkpoint(name, tmp_path_factory):
    """(config name, dir of a random transformers checkpoint, ids, its logits), made once per config."""
    if name not in _CKPTS:
        _CKPTS[name] = _make_checkpoint(name, tmp_path_factory)
    return _CKPTS[name]


def _make_checkpoint(name, tmp_path_factory):
    hf_cfg = transformers.AutoConfig.for_model(**CONFIGS[name].to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, **HF_KW)
    hf = _randomise_hf(hf.eval(), seed=0)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    ids = _ids()
    logits, router_logits = _hf_run(hf, ids)
    biases = [m.mlp.gate.moe_statics.e_score_correction_bias.numpy() for m in hf.model.layers
              if hasattr(m.mlp, "gate")]
    _assert_bias_changes_routing(router_logits, biases, CONFIGS[name].moe_k)
    return name, path, ids, logits


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_ckpt(request, tmp_path_factory):
    return _hf_checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def main_ckpt(tmp_path_factory):
    """The four-stack config with shared experts: enough for the dispatch, sharding and bf16 checks."""
    return _hf_checkpoint("shared2_untied", tmp_path_factory)


def test_transformers_to_ours(hf_ckpt):
    name, path, ids, ref = hf_ckpt
    ours = ernie_jax.from_pretrained(path, dtype="float32")
    assert ours.config == CONFIGS[name]
    if CONFIGS[name].use_bias:
        assert np.abs(np.asarray(ours.lm_head_bias[...])).max() > 0  # the random head bias was read
    assert np.abs(_our_logits(ours, ids) - ref).max() <= 1e-5


@pytest.mark.parametrize("dispatch", ["capacity", "dense"])
def test_other_dispatch_paths_on_the_loaded_model(main_ckpt, dispatch):
    name, path, ids, ref = main_ckpt
    cfg = CONFIGS[name]
    ours = ernie_jax.from_pretrained(path, moe_dispatch=dispatch, moe_capacity_factor=cfg.moe_num_experts / cfg.moe_k)
    assert ours.config.moe_dispatch == dispatch
    assert np.abs(_our_logits(ours, ids) - ref).max() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    ours = _random_ours(cfg, seed=1)
    ernie_jax.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **HF_KW).eval()
    assert type(hf).__name__ == "Ernie4_5_MoeForCausalLM"
    ids = _ids(seed=1)
    logits, router_logits = _hf_run(hf, ids)
    biases = [np.asarray(s.layers.mlp.router.bias[...][i]) for s in ours.decoder.stacks if s.kind == "moe"
              for i in range(s.num_layers)]
    _assert_bias_changes_routing(router_logits, biases, cfg.moe_k)
    assert np.abs(_our_logits(ours, ids) - logits).max() <= 1e-5


def test_sharded_multi_file_round_trip(main_ckpt, tmp_path):
    _, path, ids, ref = main_ckpt
    ernie_jax.save_pretrained(ernie_jax.from_pretrained(path), tmp_path, max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.5.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert np.abs(_our_logits(ernie_jax.from_pretrained(tmp_path), ids) - ref).max() <= 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **HF_KW).eval()
    assert np.abs(_hf_run(hf, ids)[0] - ref).max() <= 1e-5


def test_bf16_keeps_routers_fp32(main_ckpt, tmp_path):
    """Loading or saving in bf16 leaves gate.weight and e_score_correction_bias in fp32, bit-exact, as
    transformers keeps them (`_keep_in_fp32_modules_strict`)."""
    _, path, ids, _ = main_ckpt
    src = load_file(path / "model.safetensors")
    gate, bias = "model.layers.3.mlp.gate.weight", "model.layers.3.mlp.moe_statics.e_score_correction_bias"
    expert = "model.layers.3.mlp.experts.0.up_proj.weight"

    ours16 = ernie_jax.from_pretrained(path, dtype="bfloat16")
    router = ours16.decoder.stacks[1].layers.mlp.router
    assert router.kernel[...].dtype == router.bias[...].dtype == jnp.float32
    assert ours16.decoder.stacks[1].layers.mlp.experts.wi_up[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(router.kernel[...][0]), src[gate].T)
    np.testing.assert_array_equal(np.asarray(router.bias[...][0]), src[bias].reshape(-1))

    ernie_jax.save_pretrained(ours16, tmp_path / "from_bf16")  # a bf16 model, saved as it is
    ernie_jax.save_pretrained(ernie_jax.from_pretrained(path), tmp_path / "as_bf16", dtype="bfloat16")
    for d in ("from_bf16", "as_bf16"):
        f = load_file(tmp_path / d / "model.safetensors")
        assert f[gate].dtype.name == f[bias].dtype.name == "float32", d
        assert f[expert].dtype.name == "bfloat16", d
        np.testing.assert_array_equal(f[gate], src[gate])
        np.testing.assert_array_equal(f[bias], src[bias])
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as_bf16", dtype=torch.bfloat16, **HF_KW)
    assert hf16.model.layers[3].mlp.gate.weight.dtype == torch.float32
    assert hf16.model.layers[3].mlp.experts.down_proj.dtype == torch.bfloat16
    # the bf16 checkpoint read back in fp32 by both sides: still the same model
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as_bf16", dtype=torch.float32, **HF_KW)
    ours32 = ernie_jax.from_pretrained(tmp_path / "as_bf16", dtype="float32")
    assert np.abs(_our_logits(ours32, ids) - _hf_run(hf32.eval(), ids)[0]).max() <= 1e-5
