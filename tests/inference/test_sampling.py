"""Sampling: top-k / top-p masks against a numpy reference written from their definitions, greedy rows, per-row
keys independent of the batch, and the argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.inference.sampling import SamplingParams, filter_logits, row_keys, sample


def _reference_keep(logits, temperature, top_k, top_p):
    """Which tokens survive: temperature, then top-k (ties with the k-th kept), then the smallest set of the
    most likely tokens whose probability reaches top_p (renormalised after top-k)."""
    x = logits / (temperature if temperature > 0 else 1.0)
    keep = np.ones_like(x, bool)
    if top_k:
        kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        keep &= x >= kth
    order = sorted(np.flatnonzero(keep), key=lambda i: -x[i])
    p = np.exp(x[order] - x[order].max())
    p /= p.sum()
    kept, mass = [], 0.0
    for i, pi in zip(order, p):
        kept.append(i)
        mass += pi
        if mass >= top_p:
            break
    lowest = min(x[i] for i in kept)
    return keep & (x >= lowest)


def test_filter_masks_match_reference():
    rs = np.random.RandomState(0)
    v = 50
    logits = rs.randn(12, v).astype(np.float32) * 2
    logits[3, :5] = logits[3, 5]  # ties at the boundary
    temp = np.array([1.0, 0.5, 2.0, 1.0, 0.7, 1.0, 1.3, 1.0, 0.0, 1.0, 1.0, 0.9], np.float32)
    top_k = np.array([0, 5, 1, 7, 0, 50, 3, 60, 4, 0, 10, 2], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.9, 0.5, 0.3, 0.95, 0.05, 0.8, 1e-6, 0.999, 1.0], np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(temp), jnp.asarray(top_k), jnp.asarray(top_p)))
    for r in range(len(logits)):
        keep = _reference_keep(logits[r].astype(np.float64), temp[r], top_k[r], top_p[r])
        np.testing.assert_array_equal(np.isfinite(got[r]), keep, err_msg=f"row {r}")
        scale = temp[r] if temp[r] > 0 else 1.0
        np.testing.assert_allclose(got[r][keep], logits[r][keep] / scale, rtol=1e-6)
    assert np.isfinite(got[9]).sum() == 1  # tiny top_p keeps just the most likely token


def test_sample_distribution_and_greedy_rows():
    """Sampled frequencies follow softmax(logits / T) restricted to the top-k; temperature-0 rows are argmax."""
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]] * 2)
    n = 4000
    keys = row_keys(jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))
    toks = jax.jit(jax.vmap(lambda k: sample(logits, jnp.asarray([0.8, 0.0]), jnp.asarray([3, 0]),
                                             jnp.asarray([1.0, 1.0]), jnp.stack([k, k]))))(keys)
    toks = np.asarray(toks)
    assert (toks[:, 1] == 0).all()  # greedy row
    p = np.exp(np.array([2.0, 1.0, 0.5]) / 0.8)
    p /= p.sum()
    freq = np.bincount(toks[:, 0], minlength=5) / n
    assert freq[3:].sum() == 0  # outside the top-3
    np.testing.assert_allclose(freq[:3], p, atol=4 * np.sqrt(p * (1 - p) / n).max())


def test_row_keys_depend_on_seed_and_counter_only():
    a = row_keys(jnp.asarray([7, 9], jnp.uint32), jnp.asarray([3, 0]))
    b = row_keys(jnp.asarray([1, 7, 2], jnp.uint32), jnp.asarray([0, 3, 5]))
    assert (jax.random.key_data(a[0]) == jax.random.key_data(b[1])).all()
    assert not (jax.random.key_data(a[0]) == jax.random.key_data(a[1])).all()


@pytest.mark.parametrize("kw, what", [(dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
                                      (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                                      (dict(temperature=float("nan")), "temperature"), (dict(seed=-1), "seed")])
def test_bad_sampling_values(kw, what):
    with pytest.raises(ValueError, match=what):
        SamplingParams(**kw)
