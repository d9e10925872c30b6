"""The top-k router against a numpy transcription of transformers' `Ernie4_5_MoeTopKRouter`.

The correction bias is the easy thing to get subtly wrong: it must change *which* experts are chosen but
never the weights, which are the unbiased probabilities renormalised with clamp(min=moe_norm_min).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.model.router import Router, RouterBias

H, E, K = 16, 8, 2


def _router(bias, *, norm_min=1e-12, seed=0, scale=0.5):
    r = Router(H, E, K, norm_min=norm_min, std=0.02, rngs=nnx.Rngs(0))
    r.kernel[...] = jnp.asarray(scale * np.random.RandomState(seed).randn(H, E), jnp.float32)
    r.bias[...] = jnp.asarray(bias, jnp.float32)
    return r


def _reference(x, w, bias, k, norm_min):
    """transformers: fp32 logits, softmax, topk(probs + bias), gather unbiased probs, clamp-renormalise."""
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-(p + bias), axis=-1, kind="stable")[:, :k]
    wts = np.take_along_axis(p, ids, -1)
    return logits, p, ids, wts / np.maximum(wts.sum(-1, keepdims=True), norm_min)


def _x(t=32, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.RandomState(seed).randn(t, H), dtype)


@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_transformers_reference(with_bias):
    bias = np.random.RandomState(2).randn(E) * 0.1 if with_bias else np.zeros(E)
    r, x = _router(bias), _x()
    out = r(x)
    logits, p, ids, wts = _reference(x, r.kernel[...], bias, K, 1e-12)
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.probs), p, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)  # descending order, like torch.topk
    np.testing.assert_allclose(np.asarray(out.weights), wts, atol=1e-6)
    assert out.expert_ids.dtype == jnp.int32 and out.weights.dtype == jnp.float32


def test_bias_changes_selection_but_not_weights():
    """A bias pushing up two otherwise unlikely experts: they get picked, weighted by their raw probs."""
    bias = np.zeros(E)
    bias[[5, 6]] = 10.0  # dominates every probability difference
    r, x = _router(bias), _x()
    out = r(x)
    p = np.asarray(out.probs)
    plain = np.argsort(-p, axis=-1)[:, :K]
    ids = np.asarray(out.expert_ids)
    assert (np.sort(ids, -1) == [5, 6]).all()
    assert (np.sort(plain, -1) != [5, 6]).any(-1).mean() > 0.5  # plain top-k mostly differs
    raw = np.take_along_axis(p, ids, -1)
    np.testing.assert_allclose(np.asarray(out.weights), raw / raw.sum(-1, keepdims=True), atol=1e-6)
    # the weights are not those of the biased scores
    biased = raw + 10.0
    assert np.abs(np.asarray(out.weights) - biased / biased.sum(-1, keepdims=True)).max() > 1e-2


def test_norm_min_clamps_the_renormalisation():
    """With norm_min above the chosen probability mass the weights are probs / norm_min (not summing to 1)."""
    r, x = _router(np.zeros(E), norm_min=0.9, scale=0.05), _x()  # near-uniform probs: top-2 mass ~0.25 < 0.9
    out = r(x)
    raw = np.take_along_axis(np.asarray(out.probs), np.asarray(out.expert_ids), -1)
    assert raw.sum(-1).max() < 0.9
    np.testing.assert_allclose(np.asarray(out.weights), raw / 0.9, atol=1e-7)


def test_bf16_input_keeps_fp32_routing():
    """bf16 activations: logits and probs are still fp32 (from the upcast input); weights come out bf16."""
    bias = np.random.RandomState(2).randn(E) * 0.1
    r, x = _router(bias), _x(dtype=jnp.bfloat16)
    out = r(x)
    assert out.logits.dtype == out.probs.dtype == jnp.float32 and out.weights.dtype == jnp.bfloat16
    # float64 routing of the same (bf16-rounded) values: bf16 logits would be off by ~1e-2
    logits, p, ids, wts = _reference(np.asarray(x.astype(jnp.float32)), r.kernel[...], bias, K, 1e-12)
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.probs), p, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(out.weights, np.float32), wts, rtol=8e-3)


def test_bias_gets_no_gradient_and_is_not_a_param():
    """The correction bias is moved by the balancing update, never by an optimizer over nnx.Param."""
    r, x = _router(np.random.RandomState(3).randn(E) * 0.1), _x()
    assert isinstance(r.bias, RouterBias) and not isinstance(r.bias, nnx.Param)
    params = nnx.state(r, nnx.Param)
    assert [p for p, _ in nnx.to_flat_state(params)] == [("kernel",)]
    g, state = nnx.split(r)

    def loss(state):
        out = nnx.merge(g, state)(x)
        return jnp.sum(out.weights * jnp.arange(K)) + jnp.sum(out.probs ** 2)

    grads = dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(state)))
    assert not np.asarray(grads[("bias",)].get_value()).any()
    assert np.abs(np.asarray(grads[("kernel",)].get_value())).max() > 0
