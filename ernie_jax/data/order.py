"""The global, topology-independent sample order: global index g → (source, epoch, record).

A stateless function of (seed, g):
- **Mixing.** The stream is cut into blocks of `block` samples. Every block holds exactly `n_s` samples of
  source s (`n_s` = the weights apportioned over `block` by largest remainder), in an order given by a
  permutation seeded with (seed, block index). So the t-th sample drawn from source s is at a position that
  depends only on (seed, t), and g → (s, t) is O(1) amortised (blocks are computed with numpy and cached).
- **Per-source epochs.** t → (epoch e, i) = divmod(t, N_s); the record is `index_shuffle(i)` under a seed
  derived from (seed, s, e): a fresh O(1) permutation (Grain's Feistel `index_shuffle`) every epoch.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np


def _derive_seed(*parts: int) -> int:
    h = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def apportion(total: int, weights) -> np.ndarray:
    """Largest-remainder apportionment of `total` by `weights` (ties by source order)."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    exact = w * total
    n = np.floor(exact).astype(np.int64)
    rem = exact - n
    for i in np.argsort(-rem, kind="stable")[: total - int(n.sum())]:
        n[i] += 1
    return n


class GlobalOrder:
    def __init__(self, seed: int, sizes, weights, *, block: int = 4096, num_epochs: int | None = None):
        self.seed, self.sizes, self.block = int(seed), [int(n) for n in sizes], int(block)
        if any(n <= 0 for n in self.sizes):
            raise ValueError(f"every source needs at least one record, sizes {self.sizes}")
        self.counts = apportion(self.block, weights)
        if (self.counts == 0).any():
            raise ValueError(f"weights {list(weights)} give a source 0 of {block} samples per mixing block; "
                             "raise mix_block or the weight")
        self.weights = self.counts / self.block  # the realised weights
        self.num_epochs = num_epochs
        self.length = self._length() if num_epochs is not None else None

    @functools.lru_cache(maxsize=8)
    def _block(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, rank among that source's slots) for each position of block j."""
        src = np.repeat(np.arange(len(self.counts), dtype=np.int32), self.counts)
        rng = np.random.Generator(np.random.Philox(key=_derive_seed(self.seed, 0x6D6978, j)))
        src = src[rng.permutation(self.block)]
        rank = np.empty(self.block, np.int64)
        for s in range(len(self.counts)):
            m = src == s
            rank[m] = np.arange(int(m.sum()))
        return src, rank

    def locate(self, g: int) -> tuple[int, int]:
        """g → (source s, t): g is the t-th sample drawn from source s."""
        j, p = divmod(int(g), self.block)
        src, rank = self._block(j)
        s = int(src[p])
        return s, j * int(self.counts[s]) + int(rank[p])

    def record(self, s: int, t: int) -> tuple[int, int]:
        """The t-th draw from source s → (epoch, record index)."""
        from grain.experimental import index_shuffle
        n = self.sizes[s]
        e, i = divmod(int(t), n)
        if n == 1:
            return e, 0
        seed = _derive_seed(self.seed, 0x737263, s, e) % (2**32)
        return e, int(index_shuffle(i, max_index=n - 1, seed=seed, rounds=4))

    def __call__(self, g: int) -> tuple[int, int, int]:
        """g → (source, epoch, record)."""
        if self.length is not None and not 0 <= g < self.length:
            raise IndexError(f"global index {g} outside the stream [0, {self.length})")
        s, t = self.locate(g)
        e, r = self.record(s, t)
        return s, e, r

    def _length(self) -> int:
        """The first g whose source would be past its `num_epochs` epochs: the stream's length."""
        ends = []
        for s, n_s in enumerate(self.counts):
            t_end = self.num_epochs * self.sizes[s]  # the first draw that is not allowed
            j, q = divmod(t_end, int(n_s))
            src, rank = self._block(j)
            p = int(np.flatnonzero((src == s) & (rank == q))[0])
            ends.append(j * self.block + p)
        return min(ends)
