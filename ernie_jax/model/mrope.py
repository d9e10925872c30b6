"""Multimodal 3D RoPE of the ERNIE-4.5-VL LM: (t, h, w) position ids per token, and their rotary angles.

    rope_index(mm_token_type_ids [B, S], image_grid_thw [Ni, 3] | None, video_grid_thw [Nv, 3] | None,
               attention_mask [B, S] | None, segment_ids [B, S] | None, *, spatial_merge_size=2,
               temporal_merge_size=2, rule="hf") -> (position_ids int32 [3, B, S], rope_deltas int32 [B, 1])
    mrope_angles(position_ids [3, B, S], head_dim, theta, mrope_section=(22, 22, 20)) -> fp32 [B, S, D/2]

**Positions** (transformers `Ernie4_5_VLMoeModel.get_rope_index`). Over the attended tokens of a row, walk
maximal runs of equal `mm_token_type_ids` (0 text, 1 image, 2 video; start/end tokens are text here). A
text token takes position `cur` on all three rows and advances `cur` by 1. The i-th image run (counting
runs row by row, left to right) takes `image_grid_thw[i]`, likewise videos; its grid `(T, gh, gw)` gives
`Tm x Hm x Wm` tokens (`Tm = T` for images, `T / temporal_merge_size` for videos; `Hm = gh / merge`,
`Wm = gw / merge`) in (t, h, w) row-major order, at `(cur + t, cur + h, cur + w)`. After the run:
* rule "hf" (transformers): `cur += max(gh, gw) // merge` -- the temporal extent is NOT counted, so text
  after a video with `Tm > max(Hm, Wm)` (long, low-resolution) reuses positions of the video's later
  frames on the t row;
* rule "baidu" (Baidu's own processor, `cur = max(pos) + 1`): `cur += max(Tm, Hm, Wm)`.
The rules agree for images and whenever `Tm <= max(Hm, Wm)`. Rows are (t, h, w). Padding (attention_mask
0, left or right or anywhere) gets 0 on all rows and is skipped by the walk. `rope_deltas[b] = max
position of row b + 1 - number of attended tokens` (transformers' value, used for decoding offsets).
`segment_ids` (ours, packed rows): a change of segment id between consecutive attended tokens ends the
run and restarts `cur` at 0. Grid rows that are all zero are padding (static Ni / Nv under jit) and are
skipped: the i-th image run takes the i-th non-zero row. Per-row grids `[B, N, 3]` (the packed data
pipeline's layout) are read row-major, i.e. as `[B*N, 3]`.

Traceable under `jax.jit` with traced grids (only Ni, Nv, B, S static): runs, ranks and offsets come from
cumulative sums / maxima and gathers, no Python loop over values. With concrete inputs the runs are also
checked against the grids (a clear error instead of silently wrong positions); under jit they cannot be.

**Angles** (transformers `Ernie4_5_VLMoeTextRotaryEmbedding`, recomposed): rotation pair j of the LM's
interleaved RoPE (`rope.apply_interleaved_rope`) keeps its usual frequency `theta^(-2j/D)` and reads its
position from one row: j < 2*s0 and even -> h, j < 2*s0 and odd -> w, j >= 2*s0 -> t, with
`mrope_section = (s0, s1, s2)`, s0 == s1, s0 + s1 + s2 = D/2 (transformers pre-permutes `inv_freq` as
[even of the first 2*s0, odd of the first 2*s0, the rest] and interleaves h and w again afterwards). For
text (t = h = w = p) the angles equal `rope.rope_angles(p)` bit for bit.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.model.rope import inv_frequencies

RULES = ("hf", "baidu")


def _prev_index(valid: jax.Array) -> jax.Array:
    """valid bool [B, S] -> int32 [B, S]: index of the previous valid token in the row (-1 if none)."""
    idx = jnp.arange(valid.shape[1], dtype=jnp.int32)
    last = jax.lax.cummax(jnp.where(valid, idx, -1), axis=1)  # last valid index <= s
    return jnp.pad(last[:, :-1], ((0, 0), (1, 0)), constant_values=-1)


def _last_start(start: jax.Array) -> jax.Array:
    """start bool [B, S] -> int32 [B, S]: index of the latest start at or before s (0 if none)."""
    idx = jnp.arange(start.shape[1], dtype=jnp.int32)
    return jnp.maximum(jax.lax.cummax(jnp.where(start, idx, -1), axis=1), 0)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx, axis=1)


def _compact_grid(grid: jax.Array | None) -> jax.Array:
    """[N, 3] or [B, N, 3] -> [max(N, 1), 3] int32 with the non-zero rows first, in order (zero rows are
    padding)."""
    if grid is None:
        return jnp.zeros((1, 3), jnp.int32)
    grid = jnp.asarray(grid).astype(jnp.int32).reshape(-1, 3)
    order = jnp.argsort(~jnp.any(grid != 0, axis=-1), stable=True)
    return grid[order]


def _run_grids(run_start: jax.Array, types: jax.Array, kind: int, grid: jax.Array) -> jax.Array:
    """The grid [B, S, 3] of the `kind` run each token's run start belongs to, in global run order."""
    b, s = types.shape
    is_run = (run_start & (types == kind)).reshape(b * s)
    rank = (jnp.cumsum(is_run.astype(jnp.int32)) - 1).reshape(b, s)
    return grid[jnp.clip(rank, 0, grid.shape[0] - 1)]


def rope_index(mm_token_type_ids: jax.Array, image_grid_thw: jax.Array | None = None,
               video_grid_thw: jax.Array | None = None, attention_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, *, spatial_merge_size: int = 2, temporal_merge_size: int = 2,
               rule: Literal["hf", "baidu"] = "hf") -> tuple[jax.Array, jax.Array]:
    """3D position ids (int32 [3, B, S], rows t, h, w) and rope_deltas (int32 [B, 1]); see the module doc."""
    _check_args(mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask, segment_ids,
                spatial_merge_size, temporal_merge_size, rule)
    return _rope_index(mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask, segment_ids,
                       spatial_merge_size=spatial_merge_size, temporal_merge_size=temporal_merge_size, rule=rule)


# one compiled program per shape: eagerly, the ~60 small ops would each dispatch separately
@functools.partial(jax.jit, static_argnames=("spatial_merge_size", "temporal_merge_size", "rule"))
def _rope_index(mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask, segment_ids, *,
                spatial_merge_size: int, temporal_merge_size: int, rule: str) -> tuple[jax.Array, jax.Array]:
    types = jnp.asarray(mm_token_type_ids).astype(jnp.int32)
    b, s = types.shape
    valid = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)

    prev = _prev_index(valid)
    prev_c = jnp.maximum(prev, 0)
    seg_start = valid & (prev < 0)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        seg_start = seg_start | (valid & (prev >= 0) & (seg != _take(seg, prev_c)))
    run_start = seg_start | (valid & (types != _take(types, prev_c)))
    start = _last_start(run_start)  # [B, S] index of each token's run start
    count = jnp.cumsum(valid.astype(jnp.int32), axis=1)
    k = count - _take(count, start)  # [B, S] offset of the token inside its run

    is_img, is_vid = valid & (types == 1), valid & (types == 2)
    grid = jnp.where(is_img[..., None], _run_grids(run_start, types, 1, _compact_grid(image_grid_thw)),
                     _run_grids(run_start, types, 2, _compact_grid(video_grid_thw)))  # [B, S, 3]
    tm = jnp.where(is_img, grid[..., 0], grid[..., 0] // temporal_merge_size)
    hm, wm = grid[..., 1] // spatial_merge_size, grid[..., 2] // spatial_merge_size
    wm1, hm1 = jnp.maximum(wm, 1), jnp.maximum(hm, 1)  # text tokens read a dummy grid: no division by 0
    t_off, h_off, w_off = k // (hm1 * wm1), (k // wm1) % hm1, k % wm1

    is_vis = is_img | is_vid
    if rule == "hf":
        advance = jnp.maximum(grid[..., 1], grid[..., 2]) // spatial_merge_size
    else:
        advance = jnp.maximum(jnp.maximum(tm, hm), wm)
    # every text token moves cur by 1, every vision run by `advance` (booked on its first token)
    step = jnp.where(valid & ~is_vis, 1, 0) + jnp.where(run_start & is_vis, advance, 0)
    before = jnp.cumsum(step, axis=1) - step
    cur = before - _take(before, _last_start(seg_start))  # restart at every segment
    base = _take(cur, start)
    rows = [jnp.where(is_vis, base + off, cur) for off in (t_off, h_off, w_off)]
    position_ids = jnp.where(valid[None], jnp.stack(rows), 0).astype(jnp.int32)

    top = jnp.max(jnp.where(valid[None], position_ids, -1), axis=(0, 2))
    rope_deltas = (top + 1 - valid.sum(axis=1)).astype(jnp.int32)[:, None]
    return position_ids, rope_deltas


def mrope_angles(position_ids: jax.Array, head_dim: int, theta: float,
                 mrope_section: tuple[int, int, int] = (22, 22, 20)) -> jax.Array:
    """position_ids int [3, B, S] (rows t, h, w) -> rotary angles fp32 [B, S, head_dim/2]."""
    s0, s1, s2 = mrope_section
    if head_dim % 2 or s0 != s1 or min(mrope_section) < 0 or s0 + s1 + s2 != head_dim // 2:
        raise ValueError(f"mrope_section={tuple(mrope_section)} must be (s, s, r) with 2s + r = head_dim/2 = "
                         f"{head_dim / 2} (head_dim={head_dim})")
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, B, S] (rows t, h, w), got shape {position_ids.shape}")
    j = np.arange(head_dim // 2)
    row = np.where(j < 2 * s0, np.where(j % 2 == 0, 1, 2), 0)  # pair j -> row of position_ids (t=0, h=1, w=2)
    pos = jnp.moveaxis(position_ids.astype(jnp.float32)[row], 0, -1)  # [B, S, D/2]
    return pos * inv_frequencies(head_dim, theta)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_args(types, image_grid, video_grid, attention_mask, segment_ids, spatial_merge_size,
                temporal_merge_size, rule) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    for name, v in (("spatial_merge_size", spatial_merge_size), ("temporal_merge_size", temporal_merge_size)):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if np.ndim(types) != 2:
        raise ValueError(f"mm_token_type_ids must be [B, S], got shape {np.shape(types)}")
    for name, x in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
        if x is not None and np.shape(x) != np.shape(types):
            raise ValueError(f"{name} shape {np.shape(x)} != mm_token_type_ids shape {np.shape(types)}")
    for name, g in (("image_grid_thw", image_grid), ("video_grid_thw", video_grid)):
        if g is not None and (np.ndim(g) not in (2, 3) or np.shape(g)[-1] != 3):
            raise ValueError(f"{name} must be [N, 3] or [B, N, 3] (T, gh, gw), got shape {np.shape(g)}")
    if _is_concrete(types, image_grid, video_grid, attention_mask, segment_ids):
        _check_runs(np.asarray(types), image_grid, video_grid, attention_mask, segment_ids, spatial_merge_size,
                    temporal_merge_size)


def _check_runs(types: np.ndarray, image_grid, video_grid, attention_mask, segment_ids, spatial_merge_size,
                temporal_merge_size) -> None:
    """Concrete inputs only: every vision run has a grid and exactly that grid's number of tokens."""
    grids = {}
    for kind, name, g in ((1, "image_grid_thw", image_grid), (2, "video_grid_thw", video_grid)):
        g = np.zeros((0, 3), np.int64) if g is None else np.asarray(g).reshape(-1, 3)
        grids[kind] = (name, g[np.any(g != 0, axis=-1)])
        if (g < 0).any():
            raise ValueError(f"{name} has negative entries: {g.tolist()}")
    used = {1: 0, 2: 0}
    for r in range(types.shape[0]):
        keep = np.ones(types.shape[1], bool) if attention_mask is None else np.asarray(attention_mask[r]).astype(bool)
        ty = types[r][keep]
        seg = None if segment_ids is None else np.asarray(segment_ids[r])[keep]
        bad = ~np.isin(ty, (0, 1, 2))
        if bad.any():
            raise ValueError(f"mm_token_type_ids row {r} has type {int(ty[np.argmax(bad)])}; "
                             f"expected 0 (text), 1 (image) or 2 (video)")
        new = np.ones(len(ty), bool)
        new[1:] = (ty[1:] != ty[:-1]) | (False if seg is None else seg[1:] != seg[:-1])
        starts = np.flatnonzero(new)
        for a, e in zip(starts, list(starts[1:]) + [len(ty)]):
            kind = int(ty[a])
            if kind == 0:
                continue
            name, g = grids[kind]
            if used[kind] >= len(g):
                raise ValueError(f"row {r}: {('image', 'video')[kind - 1]} run #{used[kind]} (tokens {a}..{e - 1} "
                                 f"of the attended ones) has no {name} row ({len(g)} non-zero rows)")
            t, gh, gw = (int(x) for x in g[used[kind]])
            tm = t if kind == 1 else t // temporal_merge_size
            n = tm * (gh // spatial_merge_size) * (gw // spatial_merge_size)
            if e - a != n:
                raise ValueError(f"row {r}: {('image', 'video')[kind - 1]} run #{used[kind]} has {e - a} tokens "
                                 f"but {name}[{used[kind]}]={[t, gh, gw]} gives {n}")
            used[kind] += 1
