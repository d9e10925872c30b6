"""MTP speculative decoding: greedy output equals plain greedy with drafts both accepted and rejected; sampled
output follows the model's own distribution (chi-square against the exact distribution on a tiny vocabulary);
the acceptance rule alone on known distributions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import ernie_jax
from ernie_jax import get_preset
from ernie_jax.inference import Engine, KVCacheConfig, SamplingParams
from ernie_jax.inference.speculative import accept_draft
from ernie_jax.model import create_model
from ernie_jax.quantization.kv_cache import QuantizedKV

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [7]]


def _repeat_drafter(model):
    """Makes the MTP depth predict the main model's next token again for the token after it: the depth's layer
    passes its input through (zero attention output and MLP down projection) and the projection keeps only the
    normalised hidden state, so draft(p + 2) = argmax head(norm(h_p)) = the main model's token p + 1. Drafts
    are right exactly where the greedy continuation repeats a token."""
    depth = model.mtp[0]
    h = model.config.hidden_size
    depth.proj[...] = jnp.concatenate([jnp.zeros((h, h)), jnp.eye(h)])
    depth.layer.attn.wo[...] = jnp.zeros_like(depth.layer.attn.wo[...])
    depth.layer.mlp.wo[...] = jnp.zeros_like(depth.layer.mlp.wo[...])
    return model


def test_speculative_greedy_equals_plain_greedy():
    model = _repeat_drafter(create_model(get_preset("tiny-test", num_nextn_predict_layers=1,
                                                     initializer_range=0.1), seed=3))
    kw = dict(max_new_tokens=12, eos_token_id=None)
    plain = ernie_jax.generate(model, PROMPTS, **kw)
    st = {}
    spec = ernie_jax.generate(model, PROMPTS, speculative="mtp", stats=st, **kw)
    assert spec == plain
    assert 0 < st["accepted"] < st["forwards"]  # both branches taken
    # the MTP depth's cache follows the main cache's scheme: int8, rotated
    eng = Engine(model, max_slots=len(PROMPTS), max_len=32, speculative="mtp",
                 kv_cache=KVCacheConfig(bits=8, hadamard=True))
    assert isinstance(eng._cache.mtp_k[0], QuantizedKV) and eng._cache.mtp_k[0].codes.dtype == jnp.int8
    ids = [eng.submit(p, **kw) for p in PROMPTS]
    out = eng.run()
    assert [out[i] for i in ids] == plain and eng.summary()["accepted"] == st["accepted"]
    assert st["tokens_per_forward"] == pytest.approx(1 + st["acceptance_rate"])
    assert len({t for o in plain for t in o}) > 3
    # stops: eos in the middle of an accepted pair, the budget, continuous batching with two slots
    eos = plain[0][4]
    cut = lambda o: o[:o.index(eos) + 1] if eos in o else o  # noqa: E731
    eng = Engine(model, max_slots=2, max_len=32, speculative="mtp", chunk=3)
    ids = [eng.submit(p, max_new_tokens=n, eos_token_id=eos) for p, n in zip(PROMPTS, (12, 5, 12, 3, 9))]
    out = eng.run()
    for rid, p, n in zip(ids, PROMPTS, (12, 5, 12, 3, 9)):
        assert out[rid] == cut(plain[PROMPTS.index(p)][:n])


VOCAB = 12


@functools.partial(jax.jit, static_argnums=0)
def _next_probs(graphdef, state, ids):
    return jax.nn.softmax(nnx.merge(graphdef, state)(ids).logits[:, -1], axis=-1)


def _chi2_pvalue(counts, probs):
    """Pearson's chi-square over the cells, the cells expecting fewer than 5 samples merged into one."""
    n = counts.sum()
    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    small = probs * n < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(probs[~small], probs[small].sum()) * n
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep]).pvalue


def test_speculative_sampling_has_the_model_distribution():
    """3000 requests (seeds) of 3 tokens each at temperature 1 with a random (bad) MTP drafter: the joint
    distribution of the first two tokens and the marginal of the third (drawn after an accepted draft, as a
    bonus token, or after a rejection) match the model's exact ones, computed by full forwards over every
    prefix. A sampler that always accepted the draft would give the drafter's distribution instead."""
    cfg = get_preset("tiny-test", vocab_size=VOCAB, num_nextn_predict_layers=1, initializer_range=0.3)
    model = create_model(cfg, seed=0)
    prompt = [3, 7, 1]
    n = 3000
    eng = Engine(model, max_slots=n, max_len=8, speculative="mtp", chunk=2)
    for s in range(n):
        eng.submit(prompt, max_new_tokens=3, sampling=SamplingParams(temperature=1.0, seed=s))
    out = np.array(list(eng.run().values()))
    st = eng.summary()
    assert 0.05 < st["acceptance_rate"] < 0.95

    g, state = nnx.split(model)
    p1 = np.asarray(_next_probs(g, state, jnp.asarray([prompt])))[0]
    pre2 = np.array([prompt + [a] for a in range(VOCAB)])
    p2 = np.asarray(_next_probs(g, state, jnp.asarray(pre2)))  # [t1, t2]
    pre3 = np.array([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
    p3 = np.asarray(_next_probs(g, state, jnp.asarray(pre3))).reshape(VOCAB, VOCAB, VOCAB)
    joint12 = p1[:, None] * p2
    marg3 = np.einsum("ab,abc->c", joint12, p3)
    assert joint12.max() > 3 / VOCAB**2 and p1.max() > 2 / VOCAB  # far from uniform: the test can see a bias
    c12 = np.bincount(out[:, 0] * VOCAB + out[:, 1], minlength=VOCAB**2)
    c3 = np.bincount(out[:, 2], minlength=VOCAB)
    assert _chi2_pvalue(c12, joint12.ravel()) > 1e-4
    assert _chi2_pvalue(c3, marg3) > 1e-4


def test_accept_rule_on_known_distributions():
    """P(emit x) = p(x) for a fixed draft distribution q, from many keys: accepted drafts plus replacements."""
    p = jnp.asarray([0.5, 0.3, 0.2, 0.0])
    q = jnp.asarray([0.1, 0.1, 0.2, 0.6])
    n = 20000
    keys = jax.random.split(jax.random.key(0), (3, n))
    draft = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(q)))(keys[0]).astype(jnp.int32)
    acc, tok = accept_draft(jnp.broadcast_to(p, (n, 4)), jnp.broadcast_to(q, (n, 4)), draft, keys[1], keys[2])
    freq = np.bincount(np.asarray(tok), minlength=4) / n
    np.testing.assert_allclose(freq, p, atol=0.015)
    # acceptance probability sum_x min(p, q) = 0.1 + 0.1 + 0.2
    assert abs(float(np.mean(acc)) - 0.4) < 0.015
    assert (np.asarray(tok)[np.asarray(draft) == 3] != 3).all()  # p(3) = 0: never emitted
