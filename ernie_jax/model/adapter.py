"""The ERNIE-4.5-VL adapter (transformers' `Ernie4_5_VLMoeVariableResolutionResamplerModel`): ViT patch
features -> LM-width tokens.

1. Spatial merge: the m*m patches of each window (consecutive in the window-major patch order) are
   concatenated, [P, Hv] -> [P/m^2, m^2 Hv], then `LN(FC2(GELU_erf(FC1(x))))`.
2. Temporal merge, per item with s = h*w/m^2 tokens per frame: token j of frame pair k is
   `cat(f[2k][j], f[2k+1][j])`; an image (t = 1) is its frame twice, `cat(f0[j], f0[j])`. Then
   `LN(FC2(GELU_erf(FC1(x))))` ([2 m^2 Hv] -> [m^2 Hv]).
3. Linear to the LM width (with bias), then RMSNorm with the LM's eps.

An image gives h*w/m^2 tokens, a video t*h*w/(2 m^2). The temporal gather is derived from `grid_thw` with
jnp arithmetic only, so the grid may be traced: the output has the static length P/m^2 (an upper bound),
items' tokens in item order first, then padding rows (`valid` False, zeroed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import VisionConfig
from ernie_jax.model.dense import dense
from ernie_jax.model.mlp import ACTIVATIONS
from ernie_jax.model.norm import RMSNorm
from ernie_jax.model.params import const_param, normal_param
from ernie_jax.model.vision import LayerNorm, as_rows, check_grid
from ernie_jax.sharding import shard

_GELU = ACTIVATIONS["gelu"]  # torch nn.GELU(): the exact erf form


class MergeMLP(nnx.Module):
    """`LN(FC2(GELU(FC1(x))))`: w1 [In, Out], w2 [Out, Out], biases, LayerNorm over Out."""

    def __init__(self, d_in: int, d_out: int, *, eps: float, std: float, param_dtype, rngs: nnx.Rngs):
        self.w1 = normal_param(rngs, (d_in, d_out), ("vit_embed", "vit_mlp"), std=std, dtype=param_dtype)
        self.b1 = const_param(0.0, (d_out,), ("vit_mlp",), dtype=param_dtype)
        self.w2 = normal_param(rngs, (d_out, d_out), ("vit_mlp", "vit_embed"), std=std, dtype=param_dtype)
        self.b2 = const_param(0.0, (d_out,), ("vit_embed",), dtype=param_dtype)
        self.norm = LayerNorm(d_out, eps=eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, In] -> [B, T, Out]."""
        dt = x.dtype
        h = dense(x, self.w1[...].astype(dt)) + self.b1[...].astype(dt)
        h = shard(_GELU(h), ("act_batch", "act_length", "act_mlp"))
        h = dense(h, self.w2[...].astype(dt)) + self.b2[...].astype(dt)
        return self.norm(h)


def temporal_pairs(grid_thw: jax.Array, num_merged: int, merge: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """grid_thw [B, n, 3] int (traced or not) -> first, second [B, Q] int32 (indices into the [B, Q]
    spatially merged tokens) and valid [B, Q] bool, Q = num_merged: output token q concatenates merged
    tokens first[q] and second[q]. A video of t frames gives t // 2 pairs (frames 2k, 2k+1; transformers
    drops an odd last frame), an image (t = 1) one pair of its frame with itself."""

    def row(g):
        n = g.shape[0]
        t, s = g[:, 0], g[:, 1] * g[:, 2] // (merge * merge)
        pairs = jnp.where(t == 1, 1, t // 2)
        in_start = jnp.cumsum(t * s) - t * s
        out_size = pairs * s
        out_end = jnp.cumsum(out_size)
        q = jnp.arange(num_merged, dtype=jnp.int32)
        item = jnp.searchsorted(out_end, q, side="right", method="compare_all")
        valid = item < n
        i = jnp.minimum(item, n - 1)
        local = q - (out_end[i] - out_size[i])
        si = jnp.maximum(s[i], 1)
        k, j = local // si, local % si
        first = in_start[i] + 2 * k * si + j
        second = jnp.where(t[i] == 1, first, first + si)
        zero = jnp.zeros_like(first)
        return jnp.where(valid, first, zero), jnp.where(valid, second, zero), valid

    first, second, valid = jax.vmap(row)(grid_thw.astype(jnp.int32))
    return first.astype(jnp.int32), second.astype(jnp.int32), valid


class Adapter(nnx.Module):
    """Parameters: `spatial` and `temporal` (`MergeMLP`), `proj [m^2 Hv, H]` + `proj_bias [H]`, `after_norm`."""

    def __init__(self, vcfg: VisionConfig, text_hidden: int, text_rms_eps: float, *, param_dtype,
                 rngs: nnx.Rngs, std: float = 0.02):
        if vcfg.temporal_merge_size != 2:
            raise ValueError(f"VisionConfig.temporal_merge_size = {vcfg.temporal_merge_size}: the adapter "
                             f"merges frame pairs (transformers hard-codes 2)")
        pd = jnp.dtype(param_dtype)
        self.merge = vcfg.spatial_merge_size
        d = vcfg.hidden_size * self.merge ** 2
        self.spatial = MergeMLP(d, d, eps=vcfg.layer_norm_eps, std=std, param_dtype=pd, rngs=rngs)
        self.temporal = MergeMLP(2 * d, d, eps=vcfg.layer_norm_eps, std=std, param_dtype=pd, rngs=rngs)
        self.proj = normal_param(rngs, (d, text_hidden), ("vit_embed", "embed"), std=std, dtype=pd)
        self.proj_bias = const_param(0.0, (text_hidden,), ("embed",), dtype=pd)
        self.after_norm = RMSNorm(text_hidden, eps=text_rms_eps, param_dtype=pd)

    def __call__(self, features: jax.Array, grid_thw: jax.Array) -> tuple[jax.Array, jax.Array]:
        """features [N, Hv], grid_thw [n, 3] -> tokens [N/m^2, H], valid [N/m^2] bool;
        or [B, P, Hv], [B, n, 3] -> [B, P/m^2, H], [B, P/m^2]. Computes in features' dtype."""
        features, grid_thw, flat = as_rows(features, grid_thw, "features")
        m2 = self.merge ** 2
        if features.shape[1] % m2:
            raise ValueError(f"features must be [N, Hv] or [B, P, Hv] with N, P multiples of {m2} "
                             f"(spatial merge {self.merge}x{self.merge}); got shape {tuple(features.shape)}")
        check_grid(grid_thw, features.shape[1], self.merge)
        if not isinstance(grid_thw, jax.core.Tracer):
            g = np.asarray(grid_thw)
            for b, i in zip(*np.nonzero((g[..., 0] > 1) & (g[..., 0] % 2 == 1))):
                raise ValueError(f"grid_thw[{b}, {i}] = {g[b, i].tolist()}: a video needs an even number of "
                                 f"frames (the temporal merge pairs them)")
        b, p, hv = features.shape
        x = self.spatial(features.reshape(b, p // m2, m2 * hv))  # window-major order: a window is m2 rows
        first, second, valid = temporal_pairs(jnp.asarray(grid_thw), p // m2, self.merge)
        take = jax.vmap(lambda rows, idx: rows[idx])
        x = self.temporal(jnp.concatenate([take(x, first), take(x, second)], axis=-1))
        x = dense(x, self.proj[...].astype(x.dtype)) + self.proj_bias[...].astype(x.dtype)
        x = self.after_norm(x)
        x = shard(jnp.where(valid[..., None], x, 0), ("act_batch", "act_length", "act_embed"))
        return (x[0], valid[0]) if flat else (x, valid)
