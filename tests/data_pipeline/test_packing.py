"""First-fit packing: segments, positions restart per chunk, targets shift within a document, carry-over."""

import numpy as np

from ernie_jax.data.packing import chunks_of, materialize, pack_global_batch


def _stream(docs):
    it = iter(enumerate(docs))
    return lambda: next(it, None)


def test_chunks_split_long_document():
    toks = np.arange(100, 121, dtype=np.int32)  # 21 tokens: 20 positions
    cs = chunks_of(7, toks, 8)
    assert [(c.k, c.start, c.length) for c in cs] == [(0, 0, 8), (1, 8, 8), (2, 16, 4)]


def test_pack_fields_and_no_crossing():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 500, size=rng.integers(2, 40)).astype(np.int32) for _ in range(60)]
    L, R, M = 16, 6, 5
    batch, carry = pack_global_batch([], _stream(docs), seq_len=L, rows=R, max_docs=M, lookahead=4)
    assert len(carry) <= 4
    out = materialize(batch, slice(0, R), seq_len=L, max_docs=M, pad_id=0)
    for r in range(R):
        seg, pos, tok, tgt, lm = (out[k][r] for k in ("segment_ids", "positions", "tokens", "targets", "loss_mask"))
        nseg = int(seg.max())
        assert (out["sample_ids"][r][:nseg] >= 0).all() and (out["sample_ids"][r][nseg:] == -1).all()
        assert ((seg > 0) == (lm == 1)).all()
        for s in range(1, nseg + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()                   # contiguous
            assert (pos[idx] == np.arange(len(idx))).all()     # positions restart per document chunk
            doc = docs[out["sample_ids"][r][s - 1]]
            c = next(c for c in chunks_of(0, doc, L) if c.length == len(idx)
                     and (doc[c.start:c.start + c.length] == tok[idx]).all())
            assert (tgt[idx] == doc[c.start + 1:c.start + 1 + c.length]).all()  # targets never cross documents


def test_carry_over_goes_first_and_nothing_lost():
    docs = [np.arange(n, dtype=np.int32) + 3 for n in (10, 10, 10, 10, 10, 10, 10)]  # 9 positions each
    nxt = _stream(docs)
    seen = []
    carry = []
    for _ in range(5):
        batch, carry2 = pack_global_batch(carry, nxt, seq_len=10, rows=2, max_docs=4, lookahead=2)
        if carry:
            assert batch.rows[0][0] == carry[0]
        seen += [c.g for row in batch.rows for c in row]
        carry = carry2
    assert sorted(seen) == list(range(7))
