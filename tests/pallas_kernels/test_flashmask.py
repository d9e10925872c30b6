"""FlashMask kernels (pallas_kernels.flashmask) against a dense oracle, in Pallas interpret mode on CPU.

Every case runs forward and backward (dq, dk, dv) in one jitted vjp and compares at 1e-5 (fp32) with plain
attention over the boolean mask that the test reads from `startend_row_indices` itself (flashmask_oracle.py,
no code shared with the package): random masks of each Paddle form (causal n=1/2, non-causal n=2/4), GQA,
per-head masks, Sq != Sk, lengths that are not multiples of the blocks, rows (and whole batch rows) fully
masked, every mask builder, bf16. Blocks are small multiples of 8 (interpret mode) so that a few tiles exist.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashmask_oracle import dense_mask, tile_occupancy
from pallas_kernels import flashmask as fm

TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(b, sq, sk, hq, hkv, d, seed=0, dtype=jnp.float32):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(b, sq, hq, d), dtype)
    k = jnp.asarray(r.randn(b, sk, hkv, d), dtype)
    v = jnp.asarray(r.randn(b, sk, hkv, d), dtype)
    g = jnp.asarray(r.randn(b, sq, hq, d), dtype)
    return q, k, v, g


def _reference(q, k, v, allowed):
    """Softmax attention in fp32 over allowed [B, 1 or Hq, Sq, Sk] (True = attend), scale D^-0.5; query head
    h uses kv head h // (Hq / Hkv); a row with no visible key outputs zeros."""
    b, sq, hq, d = q.shape
    g = hq // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2).astype(jnp.float32), jnp.repeat(v, g, axis=2).astype(jnp.float32)
    m = jnp.broadcast_to(jnp.asarray(allowed), (b, hq, sq, k.shape[1]))
    scores = jnp.where(m, jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk) * d ** -0.5, -1e30)
    p = jnp.where(m, jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv).astype(q.dtype)


def _value_and_grads(q, k, v, idx, g, *, causal, bq, bk, kernel):
    """Output and (dq, dk, dv) for cotangent g: the kernel jitted, the oracle eagerly (op by op is faster
    than compiling it at these sizes)."""
    if kernel:
        return _kernel_value_and_grads(q, k, v, idx, g, causal=causal, bq=bq, bk=bk)
    allowed = dense_mask(idx, causal=causal, q_len=q.shape[1])
    out, vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, allowed), q, k, v)
    return out, vjp(g)


@functools.partial(jax.jit, static_argnames=("causal", "bq", "bk"))
def _kernel_value_and_grads(q, k, v, idx, g, *, causal, bq, bk):
    f = lambda q, k, v: fm.flashmask_attention(q, k, v, idx, causal=causal, block_q=bq, block_kv=bk,
                                               interpret=True)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(g)


def _check(q, k, v, idx, *, causal, bq, bk, g, tol=TOL):
    out, grads = _value_and_grads(q, k, v, idx, g, causal=causal, bq=bq, bk=bk, kernel=True)
    ref, ref_grads = _value_and_grads(q, k, v, idx, g, causal=causal, bq=bq, bk=bk, kernel=False)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, err_msg=name, **tol)
    # rows that see no key: exactly zero output and zero dq
    allowed = dense_mask(idx, causal=causal, q_len=q.shape[1])  # [B, Hm, Sq, Sk]
    empty = np.broadcast_to(~allowed.any(-1), (q.shape[0], q.shape[2], q.shape[1])).transpose(0, 2, 1)
    assert (np.asarray(out)[empty] == 0).all()
    assert (np.asarray(grads[0])[empty] == 0).all()
    return out, grads, empty


def _random_indices(r, b, hm, sk, sq, causal, n):
    j = np.arange(sk)[None, None, :]
    a = r.randint(0, sq + 1, (b, hm, sk, n))
    if causal and n == 1:  # mostly visible at least on the diagonal, some columns fully masked
        a[..., 0] = np.where(r.rand(b, hm, sk) < 0.85, r.randint(0, sq + 1, (b, hm, sk)) // 2 + j + 1,
                             r.randint(0, sq + 1, (b, hm, sk)))
        a = np.minimum(a, sq)
    elif n == 2 and causal or n == 4:  # ordered pairs
        a[..., 0:2] = np.sort(a[..., 0:2], -1)
        if n == 4:
            a[..., 2:4] = np.sort(a[..., 2:4], -1)
    return a


@pytest.mark.parametrize("causal,n", [(True, 1), (True, 2), (False, 2), (False, 4)])
def test_random_masks_gqa_ragged(causal, n):
    b, s, hq, hkv, d = 3, 200, 4, 2, 32  # 200: not a multiple of either block
    r = np.random.RandomState(n + 10 * causal)
    a = _random_indices(r, b, 1, s, s, causal, n)
    if causal:
        a[0, 0, 0, 0] = 0  # row 0 sees only key 0 under causality: now it sees nothing
    else:  # rows >= 150 see no key: lower-left masked from row 150 on, upper-right masked entirely
        a[0, 0, :, 0] = np.minimum(a[0, 0, :, 0], 150)
        if n == 4:
            a[0, 0, :, 1] = s
            a[0, 0, :, 2] = np.minimum(a[0, 0, :, 2], 150)
        a[0, 0, :, -1] = s
    a[2] = {1: [0], 2: [0, s], 4: [0, s, 0, s]}[n]  # batch row 2: every key masked for every row
    idx = jnp.asarray(a, jnp.int32)
    q, k, v, g = _qkv(b, s, s, hq, hkv, d, seed=n)
    out, grads, empty = _check(q, k, v, idx, causal=causal, bq=64, bk=128, g=g)
    assert empty[2].all() and empty[0].any() and not empty[1].all()
    assert not np.asarray(out[2]).any()
    for gr in grads:  # a fully masked batch row has zero gradients everywhere
        assert not np.asarray(gr[2]).any()


def test_cross_attention_sq_ne_sk_per_head_masks():
    b, sq, sk, hq, hkv, d = 2, 150, 230, 4, 1, 32  # MQA, Hm = Hq, non-causal 4-column masks
    r = np.random.RandomState(3)
    idx = jnp.asarray(_random_indices(r, b, hq, sk, sq, False, 4), jnp.int32)
    q, k, v, g = _qkv(b, sq, sk, hq, hkv, d, seed=4)
    _check(q, k, v, idx, causal=False, bq=64, bk=64, g=g)


def _builder_batch(s, causal):
    """Every builder of one causal flag, one per batch row, in a common column count."""
    seg = jnp.asarray(np.repeat(np.arange(6), [40, 3, 77, 1, 50, 29])[None])  # ragged documents, s = 200
    if causal:
        masks = [fm.causal_document_mask(seg), fm.sliding_window_mask(37, segment_ids=seg),
                 fm.shared_question_mask(jnp.asarray(np.repeat([0, 1], [120, 80])[None]),
                                         jnp.asarray(np.repeat([0, 1, 2, 0, 1, 2], [30, 50, 40, 20, 30, 30])[None])),
                 fm.global_sliding_window_mask(16, 5, seq_len=s, causal=True),
                 fm.causal_blockwise_mask(jnp.asarray(np.repeat([0, 1, 2, 3], [60, 50, 40, 50])[None]))]
        return jnp.concatenate([jnp.concatenate([m, jnp.full_like(m, s)], -1) if m.shape[-1] == 1 else m
                                for m in masks])
    to4 = lambda m: jnp.stack([m[..., 0], jnp.full_like(m[..., 0], s), jnp.zeros_like(m[..., 0]), m[..., 1]], -1)
    masks = [to4(fm.bidirectional_document_mask(seg)), to4(fm.sliding_window_mask(23, segment_ids=seg, causal=False)),
             to4(fm.prefix_lm_mask(seg, jnp.asarray(np.arange(s) % 40 < 15)[None])),
             fm.global_sliding_window_mask(16, 5, seq_len=s)]
    return jnp.concatenate(masks)


@pytest.mark.parametrize("causal", [True, False])
def test_every_builder(causal):
    s = 200
    idx = _builder_batch(s, causal)
    q, k, v, g = _qkv(idx.shape[0], s, s, 2, 2, 32, seed=7)
    _check(q, k, v, idx, causal=causal, bq=64, bk=64, g=g)
    st = fm.tile_statistics(idx, causal=causal, q_len=s, block_q=64, block_kv=64)
    nonempty, _ = tile_occupancy(dense_mask(idx, causal=causal, q_len=s), 64, 64)
    assert st["computed"] == nonempty.sum() < st["total"]


def test_skipped_tiles_are_never_read():
    """Batch row r has NaN keys / values in kv tile r only. A skipped tile is not read at all, a computed one
    poisons whatever it touches (even a masked entry multiplies 0 by NaN), so the NaN pattern shows which
    tiles each pass computes; it must be exactly the tiles with a visible entry, brute-forced from the dense
    mask: forward and dq rows of q tile i are NaN iff (i, r) has one; dk of kv tile j iff some q tile has a
    visible entry in both tile r and tile j (those rows' outputs, hence dO . O, are NaN). A masked NaN score
    never enters the softmax statistics, so dv (probabilities times dO) is NaN for the keys of tile r and the
    keys seen by a row that sees a key of tile r. Everything else equals the oracle on clean inputs.
    interpret=None: the interpreter chosen at lowering on CPU."""
    s, d, blk, b = 512, 16, 128, 4  # interpret=None takes the TPU block sizes (multiples of 128)
    seg = np.repeat([0, 1, 2], [200, 120, 192])  # documents straddling the tiles
    idx = fm.causal_document_mask(jnp.asarray(np.broadcast_to(seg, (b, s))))
    allowed = dense_mask(idx, causal=True, q_len=s)
    vis = tile_occupancy(allowed, blk, blk)[0][:, 0]  # [B, nq, nk]
    assert (~vis & np.tril(np.ones((4, 4), bool))).any()  # empty tiles below the diagonal, not only above
    q, k, v, g = _qkv(b, s, s, 2, 2, d, seed=5)
    tile = np.arange(s) // blk
    bad = jnp.asarray(tile[None, :] == np.arange(b)[:, None])[:, :, None, None]  # [B, Sk, 1, 1]
    f = lambda q, k, v: fm.flashmask_attention(q, k, v, idx, causal=True, block_q=blk, block_kv=blk,  # noqa: E731
                                               interpret=None)
    out, (dq, dk, dv) = jax.jit(lambda q, k, v, g: (lambda o, vjp: (o, vjp(g)))(*jax.vjp(f, q, k, v)))(
        q, jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v), g)
    rows_nan = np.stack([vis[r, tile, r] for r in range(b)])  # [B, Sq]
    cols_nan = np.stack([(vis[r, :, r, None] & vis[r]).any(0)[tile] for r in range(b)])  # [B, Sk]
    lse_nan = np.stack([allowed[r, 0][:, tile == r].any(1) for r in range(b)])  # [B, Sq]
    dv_nan = (tile == np.arange(b)[:, None]) | (allowed[:, 0] & lse_nan[:, :, None]).any(1)
    for name, a, want in (("out", out, rows_nan), ("dq", dq, rows_nan), ("dk", dk, cols_nan), ("dv", dv, dv_nan)):
        nan = np.isnan(np.asarray(a))
        np.testing.assert_array_equal(nan.any((-1, -2)), want, err_msg=name)
        assert (nan.all((-1, -2)) == want).all(), name
    assert rows_nan.any() and not rows_nan.all() and not cols_nan.all()
    ref, (rdq, rdk, rdv) = _value_and_grads(q, k, v, idx, g, causal=True, bq=blk, bk=blk, kernel=False)
    for a, r_, want in ((out, ref, rows_nan), (dq, rdq, rows_nan), (dk, rdk, cols_nan), (dv, rdv, dv_nan)):
        np.testing.assert_allclose(np.asarray(a)[~want], np.asarray(r_)[~want], **TOL)


def test_bf16():
    b, s, hq, hkv, d = 1, 256, 2, 1, 64
    idx = fm.sliding_window_mask(50, seq_len=s, batch=b)
    q, k, v, g = _qkv(b, s, s, hq, hkv, d, seed=8, dtype=jnp.bfloat16)
    out, grads = _value_and_grads(q, k, v, idx, g, causal=True, bq=128, bk=128, kernel=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    ref, ref_grads = _value_and_grads(*f32[:3], idx, f32[3], causal=True, bq=128, bk=128, kernel=False)
    assert out.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in grads)
    for a, r_ in zip((out, *grads), (ref, *ref_grads)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r_), atol=6e-2, rtol=6e-2)


def test_validation_errors():
    q, k, v, _ = _qkv(1, 64, 64, 2, 2, 16)
    ok = jnp.zeros((1, 1, 64, 1), jnp.int32)
    call = functools.partial(fm.flashmask_attention, q, k, v, interpret=True)
    with pytest.raises(ValueError, match="integer"):
        call(ok.astype(jnp.float32), causal=True)
    with pytest.raises(ValueError, match=r"\[B, 1 or Hq, Sk, n\]"):
        call(ok[0], causal=True)
    with pytest.raises(ValueError, match="does not match"):
        call(jnp.zeros((1, 1, 63, 1), jnp.int32), causal=True)
    with pytest.raises(ValueError, match="does not match"):
        call(jnp.zeros((1, 3, 64, 1), jnp.int32), causal=True)
    with pytest.raises(ValueError, match="n=1"):
        call(ok, causal=False)
    with pytest.raises(ValueError, match="n=4"):
        call(jnp.zeros((1, 1, 64, 4), jnp.int32), causal=True)
    with pytest.raises(ValueError, match=r"\[0, 64\]"):
        call(ok.at[0, 0, 3, 0].set(65), causal=True)
    with pytest.raises(ValueError, match=r"\[0, 64\]"):
        call(ok.at[0, 0, 3, 0].set(-1), causal=True)
    with pytest.raises(ValueError, match="block_q"):
        fm.flashmask_attention(q, k, v, ok, causal=True, block_q=64)  # TPU needs multiples of 128
    with pytest.raises(ValueError, match="multiple of kv heads"):
        fm.flashmask_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), ok, causal=True,
                               interpret=True)


def test_model_packed_documents_equal_separate_runs():
    """attention_impl="flashmask": segment ids of a packed row become a causal-document mask, so each
    document's logits equal those of the document run alone (XLA attention, same weights); right padding
    (attention_mask) leaves the real tokens alone too."""
    from flax import nnx

    from ernie_jax import get_preset
    from ernie_jax.model import abstract_model
    from random_weights import random_model

    alone_model = random_model(get_preset("tiny-test"), seed=1)
    model = nnx.merge(nnx.graphdef(abstract_model(get_preset("tiny-test", attention_impl="flashmask"))),
                      nnx.state(alone_model))  # the same weights
    lens = [50, 9, 37, 28]  # 124 tokens + 4 padding in one row of 128
    r = np.random.RandomState(0)
    docs = [jnp.asarray(r.randint(0, 128, (1, n)), jnp.int32) for n in lens]
    pad = 128 - sum(lens)
    packed = jnp.concatenate(docs + [jnp.zeros((1, pad), jnp.int32)], 1)
    seg = jnp.asarray(np.repeat(np.arange(len(lens) + 1), lens + [pad])[None])
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lens + [pad]])[None])
    am = jnp.asarray((np.arange(128) < sum(lens))[None].astype(np.int32))
    out = jax.jit(lambda ids, p, s, m: model(ids, positions=p, segment_ids=s, attention_mask=m).logits)(
        packed, pos, seg, am)
    assert np.isfinite(np.asarray(out)).all()
    o = 0
    for d, n in zip(docs, lens):
        np.testing.assert_allclose(np.asarray(out[:, o:o + n]), np.asarray(alone_model(d).logits), atol=1e-5)
        o += n


def _packed_batch(b, s, seed):
    """b rows of s tokens: ragged packed documents (segment ids, positions restarting per document) and
    right padding of a different length per row (attention_mask 0, segment id of its own)."""
    r = np.random.RandomState(seed)
    ids, seg, pos, am = (np.zeros((b, s), np.int32) for _ in range(4))
    for i in range(b):
        pad = int(r.randint(0, 20))
        cuts = np.sort(r.choice(np.arange(1, s - pad), size=3, replace=False))
        lens = np.diff(np.concatenate([[0], cuts, [s - pad]]))
        seg[i] = np.repeat(np.arange(len(lens) + 1), list(lens) + [pad])
        pos[i] = np.concatenate([np.arange(n) for n in list(lens) + [pad]])
        am[i, :s - pad] = 1
        ids[i] = r.randint(0, 128, s)
    return tuple(jnp.asarray(x) for x in (ids, pos, seg, am))


def _masked_square_loss(graphdef):
    from flax import nnx

    def loss(state, ids, pos, seg, am):
        logits = nnx.merge(graphdef, state)(ids, positions=pos, segment_ids=seg, attention_mask=am).logits
        return jnp.mean(jnp.where(am[..., None] > 0, logits, 0) ** 2), logits

    return jax.value_and_grad(loss, has_aux=True)


@functools.lru_cache(maxsize=None)
def _xla_reference(changes: tuple):
    """tiny-test (+ changes) weights, a packed batch, and the XLA-attention logits and parameter gradients
    on one device (no mesh): the oracle of the sharded flashmask runs."""
    from flax import nnx

    from ernie_jax import get_preset
    from ernie_jax.model import abstract_model
    from random_weights import random_model

    state = nnx.state(random_model(get_preset("tiny-test", **dict(changes)), seed=3))
    batch = _packed_batch(4, 128, seed=2)
    g_xla = nnx.graphdef(abstract_model(get_preset("tiny-test", attention_impl="xla", **dict(changes))))
    (_, logits), grads = jax.jit(_masked_square_loss(g_xla))(state, *batch)
    return state, batch, logits, grads


# (rules, mesh, config changes): q and kv heads split alike over tensor; batch-only (fsdp); MQA (the one kv
# head replicated while the query heads split over tensor = 4: dk/dv are summed over the head shards).
SHARDED = [("fsdp_tensor", dict(data=2, fsdp=2, tensor=2), ()), ("fsdp", dict(data=2, fsdp=-1), ()),
           ("tensor", dict(data=2, fsdp=1, tensor=4), (("num_key_value_heads", 1),))]


@pytest.mark.parametrize("rules,mesh_axes,changes", SHARDED, ids=["fsdp_tensor", "fsdp", "tensor-mqa"])
def test_model_sharded_mesh_matches_xla(rules, mesh_axes, changes):
    """attention_impl="flashmask" on an 8-device mesh under `activate(mesh, rules)`: the kernel runs inside a
    shard_map over the mesh, and logits and parameter gradients equal those of XLA attention (same weights,
    packed documents + padding)."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from ernie_jax import get_preset
    from ernie_jax.model import abstract_model
    from ernie_jax.sharding import MeshConfig, activate, logical_to_spec, make_mesh, param_shardings, resolve_rules

    state, batch, ref_logits, ref_grads = _xla_reference(changes)
    mesh = make_mesh(MeshConfig(**mesh_axes))
    table = resolve_rules(rules)
    spec = logical_to_spec(("act_batch", "act_length"), batch[0].shape, dict(mesh.shape), table)
    batch = tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x in batch)
    state = jax.device_put(state, param_shardings(state, mesh, table))
    g = nnx.graphdef(abstract_model(get_preset("tiny-test", attention_impl="flashmask", **dict(changes))))
    with activate(mesh, table):
        traced = jax.jit(_masked_square_loss(g)).trace(state, *batch)
        assert "shard_map" in str(traced.jaxpr)
        (_, logits), grads = traced.lower().compile()(state, *batch)
    am = np.asarray(batch[3], bool)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(np.asarray(logits)[am], np.asarray(ref_logits)[am], atol=2e-5, rtol=2e-5)
    flat, ref_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(ref_grads))
    assert flat.keys() == ref_flat.keys()
    for path, v in flat.items():
        np.testing.assert_allclose(np.asarray(v.get_value()), np.asarray(ref_flat[path].get_value()), atol=2e-5,
                                   rtol=2e-4, err_msg=str(path))


def test_flashmask_partition_specs():
    """Batch over the act_batch axes, sequence and head_dim whole, q and kv heads split alike (or kv
    replicated for one kv head, or both on the axes that divide the kv heads), indices over batch only."""
    from jax.sharding import PartitionSpec as P

    from ernie_jax.model.attention import flashmask_partition_specs
    from ernie_jax.sharding import resolve_rules

    mesh = {"data": 2, "pipeline": 1, "fsdp": 2, "expert": 1, "tensor": 4}
    ft = resolve_rules("fsdp_tensor")
    bt = ("data", "fsdp")
    assert flashmask_partition_specs((8, 256, 16, 128), (8, 256, 4, 128), mesh, ft) == (
        P(bt, None, "tensor", None), P(bt, None, "tensor", None), P(bt, None, None, None))
    assert flashmask_partition_specs((8, 256, 16, 128), (8, 256, 1, 128), mesh, ft) == (
        P(bt, None, "tensor", None), P(bt, None, None, None), P(bt, None, None, None))
    # 2 kv heads do not split 4 ways: heads stay whole for q and kv alike
    assert flashmask_partition_specs((8, 256, 16, 128), (8, 256, 2, 128), mesh, ft) == (
        P(bt, None, None, None), P(bt, None, None, None), P(bt, None, None, None))
    # act_heads over (fsdp, tensor) with the batch on data only: kv heads take the prefix that divides them
    rules = dict(ft, act_batch="data", act_heads=("tensor", "fsdp"))
    assert flashmask_partition_specs((8, 256, 16, 128), (8, 256, 4, 128), mesh, rules) == (
        P("data", None, "tensor", None), P("data", None, "tensor", None), P("data", None, None, None))
    # a sharded sequence (act_length) or head_dim is gathered: neither is ever split inside the kernel
    rules = dict(ft, act_length="tensor", act_head_dim="pipeline", act_heads=None)
    assert flashmask_partition_specs((8, 256, 16, 128), (8, 256, 4, 128), mesh, rules) == (
        P(bt, None, None, None),) * 3
