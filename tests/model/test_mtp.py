import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax import get_preset
from ernie_jax.checkpoint.safetensors_io import SafetensorsFile
from ernie_jax.model import abstract_model, create_model
from ernie_jax.model.mtp import mtp_inputs


def test_mtp_inputs_shift_left():
    ids = jnp.asarray([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(mtp_inputs(ids, 2)), [[[2, 3, 4, 0]], [[3, 4, 0, 0]]])


def _randomise(model, seed):
    """Random values in every parameter (norm scales around 1, so that each norm's weight matters)."""
    r = np.random.RandomState(seed)
    g, st = nnx.split(model)
    flat = [(p, v.replace(jnp.asarray((1 + 0.2 * r.randn(*v.get_value().shape)) if p[-1] == "scale"
                                      else 0.3 * r.randn(*v.get_value().shape), v.get_value().dtype)))
            for p, v in nnx.to_flat_state(st)]
    return nnx.merge(g, nnx.from_flat_state(flat))


def _rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps)


def _rope(x, theta):
    """Interleaved pairs (x[2j], x[2j+1]) rotated by p * theta^(-2j/d); x [B, S, N, d] (architecture doc §3.3)."""
    s, d = x.shape[1], x.shape[-1]
    a = np.arange(s)[:, None] * theta ** (-np.arange(0, d, 2) / d)  # [S, d/2]
    cos, sin = np.cos(a)[None, :, None], np.sin(a)[None, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    return out


def _layer(x, w, cfg):
    """One pre-norm decoder layer with a dense SwiGLU MLP (architecture doc §3.2, §3.4), float64.
    w: the layer's raw arrays, wq [H, Nq, d], wk / wv [H, Nkv, d], wo [Nq, d, H], MLP [H, I] / [I, H]."""
    eps = cfg.rms_norm_eps
    a = _rms(x, w["input_norm", "scale"], eps)
    q = _rope(np.einsum("bsh,hnd->bsnd", a, w["attn", "wq"]), cfg.rope_theta)
    k = _rope(np.einsum("bsh,hnd->bsnd", a, w["attn", "wk"]), cfg.rope_theta)
    v = np.einsum("bsh,hnd->bsnd", a, w["attn", "wv"])
    g = q.shape[2] // k.shape[2]  # query head h uses kv head h // g
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = x.shape[1]
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum("bnqk,bknd,ndh->bqh", p, v, w["attn", "wo"])
    m = _rms(x, w["post_attn_norm", "scale"], eps)
    gate, up = m @ w["mlp", "wi_gate"], m @ w["mlp", "wi_up"]
    return x + (gate / (1 + np.exp(-gate)) * up) @ w["mlp", "wo"]


def _reference_logits(model, cfg, ids, depths):
    """Main and MTP logits from the raw weights, float64 (architecture doc §7): h_0 = the last decoder layer's
    output (before the final norm); depth d: u = cat[RMSNorm_emb(E[ids shifted left by d, 0-filled]),
    RMSNorm_hid(h_{d-1})] @ proj [2H, H], h_d = Layer_d(u); every h goes through the final norm and the tied head."""
    w = {p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(nnx.state(model))}
    emb, eps = w["embed",], cfg.rms_norm_eps
    head = lambda h: _rms(h, w["final_norm", "scale"], eps) @ emb.T  # noqa: E731
    h = emb[ids]
    for i in range(cfg.num_hidden_layers):
        stack = "decoder", "stacks", 0, "layers"
        h = _layer(h, {p[4:]: a[i] for p, a in w.items() if p[:4] == stack}, cfg)
    main, mtp = head(h), []
    b, s = ids.shape
    for d in range(1, depths + 1):
        dw = {p[2:]: a for p, a in w.items() if p[:2] == ("mtp", d - 1)}
        shifted = np.concatenate([ids[:, d:], np.zeros((b, d), ids.dtype)], 1)
        u = np.concatenate([_rms(emb[shifted], dw["emb_norm", "scale"], eps),
                            _rms(h, dw["hidden_norm", "scale"], eps)], -1) @ dw["proj",]
        h = _layer(u, {p[1:]: a for p, a in dw.items() if p[0] == "layer"}, cfg)
        mtp.append(head(h))
    return main, np.stack(mtp)


def test_mtp_depths_follow_the_training_definition():
    """Two depths (depth 2 chains on depth 1's hidden state) against a float64 numpy forward written from
    the raw weight arrays; random norm scales tell emb_norm from hidden_norm and the depths apart."""
    cfg = get_preset("tiny-test", num_nextn_predict_layers=2)
    model = _randomise(abstract_model(cfg), seed=1)  # every value random: no initialiser to compile
    ids = np.random.RandomState(0).randint(0, 128, (2, 7))
    out = model(jnp.asarray(ids), mtp_input_ids=mtp_inputs(jnp.asarray(ids), 2))
    assert out.mtp_logits.shape == (2, 2, 7, 128)
    main, mtp = _reference_logits(model, cfg, ids, 2)
    scale = np.abs(mtp).max()
    np.testing.assert_allclose(np.asarray(out.logits), main, atol=1e-5 * scale, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mtp_logits), mtp, atol=1e-5 * scale, rtol=1e-5)
    with pytest.raises(ValueError, match="mtp_input_ids must be"):
        model(jnp.asarray(ids), mtp_input_ids=mtp_inputs(jnp.asarray(ids), 1))


def test_mtp_gradients_reach_mtp_and_trunk():
    # ragged_dot: the quickest grouped matmul to compile on CPU (each backend has its own tests)
    cfg = get_preset("tiny-moe-test", num_nextn_predict_layers=2, moe_gmm_impl="ragged_dot")
    g, st = nnx.split(_randomise(abstract_model(cfg), seed=1))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 8)))
    grads = jax.jit(jax.grad(lambda st: jnp.mean(nnx.merge(g, st)(ids, mtp_input_ids=mtp_inputs(ids, 2))
                                                 .mtp_logits ** 2)))(st)
    assert float(jnp.abs(grads["mtp"][1]["proj"].get_value()).max()) > 0
    assert float(jnp.abs(grads["decoder"]["stacks"][0]["layers"]["attn"]["wq"].get_value()).max()) > 0


def test_mtp_keys_round_trip(tmp_path):
    """transformers drops the mtp_* keys, so check our own save -> load of them (hub names, §7)."""
    cfg = get_preset("tiny-moe-test", num_nextn_predict_layers=1, tie_word_embeddings=False)
    model = create_model(cfg, seed=2)
    ernie_jax.save_pretrained(model, tmp_path)
    f = SafetensorsFile(str(tmp_path / "model.safetensors"))
    assert f.shape("model.mtp_linear_proj.0.weight") == (32, 64)  # torch Linear(2H -> H) layout
    assert {"model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight",
            "model.mtp_block.0.mlp.gate_proj.weight", "model.mtp_block.0.self_attn.q_proj.weight"} <= set(f.keys())
    back = ernie_jax.from_pretrained(tmp_path)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    # a config without MTP ignores the keys, as transformers does
    import json
    c = json.load(open(tmp_path / "config.json"))
    del c["num_nextn_predict_layers"]
    json.dump(c, open(tmp_path / "config.json", "w"))
    assert not hasattr(ernie_jax.from_pretrained(tmp_path), "mtp")
