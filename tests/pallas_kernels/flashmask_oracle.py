"""Oracles of the FlashMask tests, written from Paddle's `flashmask_attention` definition and sharing no code
with pallas_kernels.flashmask (whose kernels, dense reference and tile statistics all read one canonical form).

`startend_row_indices` [B, Hm, Sk, n], for key column j; query row i is in the lower-left triangle when i >= j
(diagonal included), in the upper-right one when i < j:
  causal n=1 [LTS]:                lower-left rows i >= LTS masked; the upper-right masked by causality
  causal n=2 [LTS, LTE]:           lower-left rows LTS <= i < LTE masked
  non-causal n=2 [LTS, UTE]:       lower-left rows i >= LTS masked, upper-right rows i < UTE masked
  non-causal n=4 [LTS, LTE, UTS, UTE]: lower-left LTS <= i < LTE and upper-right UTS <= i < UTE masked
"""

from __future__ import annotations

import numpy as np


def dense_mask(startend_row_indices, *, causal: bool, q_len: int) -> np.ndarray:
    """bool [B, Hm, Sq, Sk], True = attend, column by column from the definition above."""
    a = np.asarray(startend_row_indices)
    b, hm, sk, n = a.shape
    i = np.arange(q_len)
    out = np.zeros((b, hm, q_len, sk), bool)
    for r, h, j in np.ndindex(b, hm, sk):
        c = [int(x) for x in a[r, h, j]]
        if causal:
            lts, lte = c[0], (c[1] if n == 2 else q_len)
            masked_ll, masked_ur = (i >= lts) & (i < lte), np.ones(q_len, bool)
        elif n == 2:
            masked_ll, masked_ur = i >= c[0], i < c[1]
        else:
            masked_ll, masked_ur = (i >= c[0]) & (i < c[1]), (i >= c[2]) & (i < c[3])
        out[r, h, :, j] = ~np.where(i >= j, masked_ll, masked_ur)
    return out


def tile_occupancy(allowed: np.ndarray, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """allowed [B, H, Sq, Sk] -> (any entry visible, every entry visible) [B, H, nq, nk] per (bq, bk) tile, by
    brute force; the last tiles are cut at Sq / Sk (padding is not part of any tile)."""
    b, h, sq, sk = allowed.shape
    nq, nk = -(-sq // bq), -(-sk // bk)
    any_ = np.zeros((b, h, nq, nk), bool)
    all_ = np.zeros((b, h, nq, nk), bool)
    for qi, ki in np.ndindex(nq, nk):
        t = allowed[:, :, qi * bq:(qi + 1) * bq, ki * bk:(ki + 1) * bk]
        any_[:, :, qi, ki] = t.any((-1, -2))
        all_[:, :, qi, ki] = t.all((-1, -2))
    return any_, all_
