import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.model.attention import AttentionMask, attention


def _naive(q, k, v, allowed, scale):
    """Loop-free numpy reference with transformers' repeat_kv (repeat_interleave over heads)."""
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k).astype(np.float64) * scale
    s = np.where(allowed[:, None], s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    p = np.nan_to_num(p)  # rows with no visible key -> zero output
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(b=2, sq=6, sk=6, hq=4, hkv=2, d=8, seed=0):
    r = np.random.RandomState(seed)
    return (r.randn(b, sq, hq, d).astype(np.float32), r.randn(b, sk, hkv, d).astype(np.float32),
            r.randn(b, sk, hkv, d).astype(np.float32))


def _allowed(b, sq, sk, *, causal=True, seg=None, valid=None):
    """[B, Sq, Sk] bool by explicit loops over (query, key), from the definition: the queries are the last Sq
    of Sk positions; query i sees key j if j <= i + Sk - Sq (causal), both lie in the same segment, and key j
    is not padding."""
    out = np.zeros((b, sq, sk), bool)
    for r in range(b):
        for i in range(sq):
            for j in range(sk):
                out[r, i, j] = ((not causal or j <= i + sk - sq) and (seg is None or seg[r][i] == seg[r][j])
                                and (valid is None or bool(valid[r][j])))
    return out


@pytest.mark.parametrize("impl", ["xla", "jax_nn"])
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_causal_gqa_matches_naive(impl, hkv):
    q, k, v = _inputs(hkv=hkv)
    mask = AttentionMask(causal=True)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl=impl)
    ref = _naive(q, k, v, _allowed(2, 6, 6), 8 ** -0.5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6)


@pytest.mark.parametrize("impl", ["xla", "jax_nn"])
def test_segments_padding_and_fully_masked_rows(impl):
    q, k, v = _inputs(sq=7, sk=7)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    valid = jnp.asarray([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    # key 0 of row 0 padded too: query 0 then sees nothing at all
    valid = valid.at[0, 0].set(0)
    mask = AttentionMask(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_valid=valid.astype(bool))
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl=impl)
    allowed = _allowed(2, 7, 7, seg=np.asarray(seg), valid=np.asarray(valid))
    assert not allowed[0, 0].any()
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, allowed, 8 ** -0.5), atol=2e-6)
    assert np.all(np.asarray(out)[0, 0] == 0)

    def loss(q_):
        return jnp.sum(attention(q_, jnp.asarray(k), jnp.asarray(v), mask, impl=impl) ** 2)

    g = np.asarray(jax.grad(loss)(jnp.asarray(q)))
    assert np.isfinite(g).all() and np.all(g[0, 0] == 0)


def test_decode_offset_causal():
    """Sq < Sk: the queries are the last Sq positions, query i sees keys <= i + Sk - Sq."""
    q, k, v = _inputs(sq=2, sk=5)
    mask = AttentionMask(causal=True)
    allowed = _allowed(2, 2, 5)
    assert allowed[0].tolist() == [[True, True, True, True, False], [True] * 5]
    np.testing.assert_allclose(np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)),
                               _naive(q, k, v, allowed, 8 ** -0.5), atol=2e-6)


def test_bad_heads_and_impl():
    q, k, v = _inputs(hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), AttentionMask())
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), AttentionMask(), impl="flash")


def test_every_query_sees_a_key():
    valid = jnp.ones((1, 4), bool)
    seg = jnp.ones((1, 4), jnp.int32)
    assert AttentionMask(causal=True).every_query_sees_a_key(4, 4)
    assert AttentionMask(causal=True).every_query_sees_a_key(1, 4)  # decoding: the last query sees all keys
    assert not AttentionMask(causal=True).every_query_sees_a_key(4, 3)
    assert not AttentionMask(causal=False).every_query_sees_a_key(4, 4)
    assert not AttentionMask(causal=True, kv_valid=valid).every_query_sees_a_key(4, 4)
    assert not AttentionMask(causal=True, q_segment_ids=seg, kv_segment_ids=seg).every_query_sees_a_key(4, 4)


@pytest.mark.parametrize("case", ["causal", "packed", "prefill_with_cache"])
def test_blocked_causal_matches_naive_and_unblocked(case, monkeypatch):
    """Sq >= 128: the XLA path runs query blocks against key prefixes; same values and gradients."""
    import importlib
    attn_mod = importlib.import_module("ernie_jax.model.attention")

    sq, sk = (128, 160) if case == "prefill_with_cache" else (128, 128)
    q, k, v = _inputs(sq=sq, sk=sk, d=16)
    mask, seg = AttentionMask(causal=True), None
    if case == "packed":
        seg = np.repeat(np.array([[1, 2, 3, 0], [1, 1, 2, 2]]), 32, axis=1)
        seg[0, 0] = 9  # a document of one token
        mask = AttentionMask(causal=True, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
                             kv_valid=jnp.asarray(seg != 0))
    args = tuple(jnp.asarray(x) for x in (q, k, v))
    out = attention(*args, mask)
    allowed = _allowed(2, sq, sk, seg=seg, valid=None if seg is None else seg != 0)
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, allowed, 16 ** -0.5), atol=2e-6)

    def grads():
        return jax.grad(lambda q_, k_, v_: jnp.sum(jnp.sin(attention(q_, k_, v_, mask))), argnums=(0, 1, 2))(*args)

    blocked = grads()
    monkeypatch.setattr(attn_mod, "_MIN_BLOCKED_QUERIES", 10**9)
    for a, b in zip(blocked, grads()):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)  # fp32 rounding


@pytest.mark.parametrize("impl", ["xla", "jax_nn", "flashmask"])
def test_shared_question_rows_hide_the_chosen_reply_from_the_rejected_one(impl):
    """DPO rows [prompt | chosen | rejected] per segment: kv_visible_until hides each chosen key from the rows
    after its reply; the oracle builds the mask by hand from the (prompt, chosen, rejected) lengths."""
    lengths = [[(3, 2, 2), (2, 1, 2)], [(4, 3, 1)]]  # per row: segments of (prompt, chosen, rejected)
    s = 16
    q, k, v = _inputs(sq=s, sk=s, hq=2, hkv=1, d=128)
    seg, until = np.zeros((2, s), np.int32), np.full((2, s), s, np.int32)
    allowed = np.zeros((2, s, s), bool)
    for r, segs in enumerate(lengths):
        o = 0
        for j, (p, c, n) in enumerate(segs):
            seg[r, o:o + p + c + n] = j + 1
            until[r, o + p:o + p + c] = o + p + c
            rows = range(o, o + p + c + n)
            for i in rows:  # prompt keys: every later row of the pair; chosen keys: later chosen rows only
                for key in range(o, i + 1):
                    in_chosen = o + p <= key < o + p + c
                    allowed[r, i, key] = not in_chosen or i < o + p + c
            o += p + c + n
    mask = AttentionMask(causal=True, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
                         kv_valid=jnp.asarray(seg != 0), kv_visible_until=jnp.asarray(until))
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl=impl)
    ref = _naive(q, k, v, allowed, 128 ** -0.5)
    real = seg != 0
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=2e-5)
    assert not np.allclose(ref, _naive(q, k, v, _allowed(2, s, s, seg=seg, valid=seg != 0), 128 ** -0.5))
