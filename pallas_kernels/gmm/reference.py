"""Oracles for the grouped matmul: `jax.lax.ragged_dot` (differentiable, any size) and plain numpy loops in
float64 (tiny cases, and to check the ragged_dot oracle itself). Same semantics as `ops.gmm` / `ops.tgmm`,
`group_offset` included (ragged_dot has none: the local weights are placed in a zero [G, K, N] stack)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gmm_reference(lhs, rhs, group_sizes, *, group_offset=0, transpose_rhs=False, preferred_element_type=None):
    """ragged_dot(lhs, rhs placed at group_offset in G zero groups, group_sizes) at HIGHEST precision.
    lhs [M, K], rhs [GL, K, N] ([GL, N, K] with transpose_rhs), group_sizes [G] -> [M, N]."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    g = group_sizes.shape[0]
    full = jnp.zeros((g, *rhs.shape[1:]), rhs.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, rhs, jnp.asarray(group_offset, jnp.int32), 0)
    out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
    return jax.lax.ragged_dot(lhs, full, jnp.asarray(group_sizes, jnp.int32), precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=out_dtype)


def tgmm_reference(lhs, grad, group_sizes, *, group_offset=0, num_local_groups=None,
                   preferred_element_type=jnp.float32):
    """out[j] = lhs[:, rows of group group_offset + j] @ grad[those rows]; lhs [K, M], grad [M, N] -> [GL, K, N].
    A masked einsum over all G groups (dense, fine for tests), then the local slice."""
    g = group_sizes.shape[0]
    gl = g if num_local_groups is None else num_local_groups
    m = lhs.shape[1]
    ends = jnp.cumsum(jnp.asarray(group_sizes, jnp.int32))
    rows = jnp.arange(m)
    member = (rows[:, None] < ends[None, :]) & (rows[:, None] >= (ends - group_sizes)[None, :])  # [M, G]
    out = jnp.einsum("KM,MG,MN->GKN", lhs.astype(jnp.float32), member.astype(jnp.float32),
                     grad.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jax.lax.dynamic_slice_in_dim(out, jnp.asarray(group_offset, jnp.int32), gl, 0).astype(
        preferred_element_type)


def _bounds(group_sizes):
    ends = np.cumsum(np.asarray(group_sizes, np.int64))
    return ends - np.asarray(group_sizes, np.int64), ends


def gmm_numpy(lhs, rhs, group_sizes, *, group_offset=0, transpose_rhs=False) -> np.ndarray:
    """The definition, one group at a time, in float64."""
    lhs = np.asarray(lhs, np.float64)
    rhs = np.asarray(rhs, np.float64)
    if transpose_rhs:
        rhs = rhs.swapaxes(1, 2)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    for g, (s, e) in enumerate(zip(*_bounds(group_sizes))):
        j = g - group_offset
        if 0 <= j < rhs.shape[0]:
            out[s:e] = lhs[s:e] @ rhs[j]
    return out


def tgmm_numpy(lhs, grad, group_sizes, *, group_offset=0, num_local_groups=None) -> np.ndarray:
    """The definition, one group at a time, in float64; lhs [K, M], grad [M, N] -> [GL, K, N]."""
    lhs = np.asarray(lhs, np.float64)
    grad = np.asarray(grad, np.float64)
    gl = len(group_sizes) if num_local_groups is None else num_local_groups
    out = np.zeros((gl, lhs.shape[0], grad.shape[1]))
    for g, (s, e) in enumerate(zip(*_bounds(group_sizes))):
        j = g - group_offset
        if 0 <= j < gl:
            out[j] = lhs[:, s:e] @ grad[s:e]
    return out
