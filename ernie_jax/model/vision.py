"""The ERNIE-4.5-VL vision encoder (transformers' `Ernie4_5_VLMoeVisionTransformerPretrainedModel`).

Patches (flattened `(C, p, p)`, in 2x2-window-major order per frame, as the image processor emits them) ->
Linear patch embedding (no bias) -> `depth` pre-norm blocks `x += Proj(Attn(LN1(x))); x += FC2(act(FC1(LN2(x))))`
with a fused qkv, 2D rotate-half RoPE (`vision_rope`) and bidirectional attention restricted to each frame
-> final LayerNorm. Blocks are stacked on a `layers` axis and run under `jax.lax.scan`.

Image packing: one row of patches holds several images / videos of different sizes, described by
`grid_thw` rows `(t, h, w)` laid out one after the other from patch 0. `patch_layout` derives, with jnp
arithmetic only (so `grid_thw` may be traced under jit), each patch's frame (its attention segment) and its
(row, column) in the image; patches after the last item, and items whose grid is all zero, are padding:
they see no key and their output is to be ignored. Attention goes through `ernie_jax.model.attention`
with a block-diagonal `AttentionMask`, which the FlashMask kernel serves as well.

Two layouts: flat (transformers': `pixel_values [N, D]`, `grid_thw [n, 3]`) is the one-row case of the
batched one (`[B, P, D]`, `[B, n, 3]`: row b's items from its patch 0), which the training pipeline
produces and which shards over the batch axis.

Logical axes: `vit_embed` (ViT width), `vit_heads`, `vit_mlp` (MLP width) on parameters; activations use
the LM's `act_*` names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.config import VisionConfig
from ernie_jax.model.attention import AttentionMask, attention
from ernie_jax.model.decoder import stack_modules
from ernie_jax.model.dense import dense
from ernie_jax.model.mlp import ACTIVATIONS
from ernie_jax.model.params import const_param, normal_param
from ernie_jax.model.remat import remat
from ernie_jax.model.vision_rope import apply_rotate_half_rope, vision_rope_angles
from ernie_jax.sharding import shard

_ACT = ("act_batch", "act_length", "act_embed")


# ------------------------------------------------------------------------------------------ layout
@struct.dataclass
class PatchLayout:
    """Per patch of a [B, P] patch grid: what it attends to and where it sits.

    segment_ids [B, P] int32: one id per frame of each item (consecutive), -1 on padding.
    coords [B, P, 2] int32: (row, column) of the patch in its frame (0 on padding).
    valid [B, P] bool: False on padding.
    """

    segment_ids: jax.Array
    coords: jax.Array
    valid: jax.Array


def check_grid(grid_thw, num_patches: int, merge: int) -> None:
    """Raises ValueError naming the row and item if a concrete `grid_thw [B, n, 3]` is not a valid layout of
    `num_patches` patches per row; a traced grid is trusted (only its shape is checked)."""
    if grid_thw.ndim != 3 or grid_thw.shape[-1] != 3 or grid_thw.shape[1] == 0:
        raise ValueError(f"grid_thw must be [B, n >= 1, 3] (or [n, 3]); got shape {tuple(grid_thw.shape)}")
    if isinstance(grid_thw, jax.core.Tracer):
        return
    g = np.asarray(grid_thw).astype(np.int64)
    for b, i in zip(*np.nonzero((g < 0).any(-1))):
        raise ValueError(f"grid_thw[{b}, {i}] = {g[b, i].tolist()}: negative size")
    for b, i in zip(*np.nonzero(((g[..., 1] % merge) | (g[..., 2] % merge)).astype(bool))):
        raise ValueError(f"grid_thw[{b}, {i}] = {g[b, i].tolist()}: h and w must be multiples of the spatial "
                         f"merge size {merge}")
    used = g.prod(-1).sum(-1)
    for b in np.nonzero(used > num_patches)[0]:
        raise ValueError(f"grid_thw[{b}] describes {used[b]} patches but the row holds {num_patches}")


def as_rows(x: jax.Array, grid_thw, name: str) -> tuple[jax.Array, jax.Array | np.ndarray, bool]:
    """The two input layouts as rows: (x [N, D], grid [n, 3]) -> ([1, N, D], [1, n, 3], True); (x [B, P, D],
    grid [B, n, 3]) -> unchanged, False. A concrete grid becomes numpy (checked by `check_grid`)."""
    if not isinstance(grid_thw, jax.Array):
        grid_thw = np.asarray(grid_thw)
    flat = x.ndim == 2
    if flat:
        x, grid_thw = x[None], grid_thw[None]
    if x.ndim != 3 or grid_thw.ndim != 3 or grid_thw.shape[0] != x.shape[0]:
        raise ValueError(f"{name} {tuple(x.shape[flat:])} and grid_thw {tuple(grid_thw.shape[flat:])} do not match: "
                         f"expected [N, D] with [n, 3], or [B, P, D] with [B, n, 3]")
    return x, grid_thw, flat


def _row_layout(grid: jax.Array, num_patches: int, merge: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """grid [n, 3] int32 -> segment_ids [P], coords [P, 2], valid [P] of one row."""
    n = grid.shape[0]
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    size = t * h * w
    end = jnp.cumsum(size)
    frames_before = jnp.cumsum(t) - t
    p = jnp.arange(num_patches, dtype=jnp.int32)
    # the item holding patch p: the first whose end is > p; n on padding (empty items are skipped)
    item = jnp.searchsorted(end, p, side="right", method="compare_all")
    valid = item < n
    i = jnp.minimum(item, n - 1)
    local = p - (end[i] - size[i])
    hw = jnp.maximum(h[i] * w[i], 1)
    frame, r = local // hw, local % hw
    # 2x2-window-major order: windows row-major over (h/m, w/m), then the m*m patches of a window row-major
    win, inner = r // (merge * merge), r % (merge * merge)
    windows_per_row = jnp.maximum(w[i] // merge, 1)
    row = (win // windows_per_row) * merge + inner // merge
    col = (win % windows_per_row) * merge + inner % merge
    seg = jnp.where(valid, frames_before[i] + frame, -1)
    coords = jnp.where(valid[:, None], jnp.stack([row, col], axis=-1), 0)
    return seg.astype(jnp.int32), coords.astype(jnp.int32), valid


def patch_layout(grid_thw: jax.Array, num_patches: int, merge: int) -> PatchLayout:
    """grid_thw [B, n, 3] int (traced or not) -> the `PatchLayout` of B rows of `num_patches` patches."""
    seg, coords, valid = jax.vmap(lambda g: _row_layout(g, num_patches, merge))(grid_thw.astype(jnp.int32))
    return PatchLayout(seg, coords, valid)


# ------------------------------------------------------------------------------------------ modules
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch `nn.LayerNorm` numerics: statistics, scale and bias in fp32, then cast to x's dtype. x: [..., H]."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = const_param(1.0, (dim,), ("norm",), dtype=param_dtype)
        self.bias = const_param(0.0, (dim,), ("norm",), dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class VisionAttention(nnx.Module):
    """Fused qkv [Hv, 3, N, D] (+ bias [3, N, D]), output projection wo [N, D, Hv] (+ bias [Hv])."""

    def __init__(self, vcfg: VisionConfig, *, attention_impl: str, std: float, param_dtype, rngs: nnx.Rngs):
        hv, n, d = vcfg.hidden_size, vcfg.num_heads, vcfg.head_dim
        self.head_dim, self.rope_theta, self.attention_impl = d, vcfg.rope_theta, attention_impl
        self.wqkv = normal_param(rngs, (hv, 3, n, d), ("vit_embed", None, "vit_heads", None), std=std,
                                 dtype=param_dtype)
        self.bqkv = const_param(0.0, (3, n, d), (None, "vit_heads", None), dtype=param_dtype)
        self.wo = normal_param(rngs, (n, d, hv), ("vit_heads", None, "vit_embed"), std=std, dtype=param_dtype)
        self.bo = const_param(0.0, (hv,), ("vit_embed",), dtype=param_dtype)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: AttentionMask) -> jax.Array:
        """x [B, P, Hv], angles [B, P, D/2] -> [B, P, Hv]."""
        dt = x.dtype
        qkv = dense(x, self.wqkv[...].astype(dt)) + self.bqkv[...].astype(dt)
        names = ("act_batch", "act_length", "act_heads", None)
        q = checkpoint_name(shard(qkv[:, :, 0], names), "query_proj")
        k = checkpoint_name(shard(qkv[:, :, 1], names), "key_proj")
        v = checkpoint_name(shard(qkv[:, :, 2], names), "value_proj")
        q, k = apply_rotate_half_rope(q, angles), apply_rotate_half_rope(k, angles)
        o = attention(q, k, v, mask, scale=self.head_dim ** -0.5, impl=self.attention_impl)
        o = checkpoint_name(shard(o, names), "attention_out")
        out = dense(o, self.wo[...].astype(dt), n_in=2) + self.bo[...].astype(dt)
        return checkpoint_name(shard(out, _ACT), "out_proj")


class VisionMLP(nnx.Module):
    """`fc2(act(fc1(x)))` with biases: w1 [Hv, I], w2 [I, Hv]."""

    def __init__(self, hidden: int, width: int, *, act: str, std: float, param_dtype, rngs: nnx.Rngs):
        self.act = act
        self.w1 = normal_param(rngs, (hidden, width), ("vit_embed", "vit_mlp"), std=std, dtype=param_dtype)
        self.b1 = const_param(0.0, (width,), ("vit_mlp",), dtype=param_dtype)
        self.w2 = normal_param(rngs, (width, hidden), ("vit_mlp", "vit_embed"), std=std, dtype=param_dtype)
        self.b2 = const_param(0.0, (hidden,), ("vit_embed",), dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, P, Hv] -> [B, P, Hv]."""
        dt = x.dtype
        hid = dense(x, self.w1[...].astype(dt)) + self.b1[...].astype(dt)
        hid = checkpoint_name(shard(hid, ("act_batch", "act_length", "act_mlp")), "mlp_up")
        out = dense(ACTIVATIONS[self.act](hid), self.w2[...].astype(dt)) + self.b2[...].astype(dt)
        return checkpoint_name(shard(out, _ACT), "mlp_out")


class VisionBlock(nnx.Module):
    def __init__(self, vcfg: VisionConfig, *, attention_impl: str, std: float, param_dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(vcfg, attention_impl=attention_impl, std=std, param_dtype=param_dtype,
                                    rngs=rngs)
        self.norm2 = LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = VisionMLP(vcfg.hidden_size, vcfg.intermediate_size, act=vcfg.hidden_act, std=std,
                             param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: AttentionMask) -> jax.Array:
        """x [B, P, Hv] -> [B, P, Hv]."""
        x = x + self.attn(self.norm1(x), angles, mask)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nnx.Module):
    """The ViT. Parameters: `patch_embed [C*p*p, Hv]`, `blocks` (stacked on `layers`), `final_norm`.

    attention_impl: `ernie_jax.model.attention` implementation ("xla", "jax_nn", "flashmask");
    remat_policy: `ernie_jax.model.remat` policy of the scanned block; std: init of the linear weights
    (transformers' `initializer_range`).
    """

    def __init__(self, vcfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs, attention_impl: str = "xla",
                 remat_policy: str = "none", std: float = 0.02):
        if vcfg.head_dim % 4:  # a quarter of each head per axis, rotate-half over both halves
            raise ValueError(f"VisionConfig: head_dim = hidden_size / num_heads = {vcfg.head_dim} must be a "
                             f"multiple of 4 for the 2D RoPE")
        pd = jnp.dtype(param_dtype)
        self.vcfg, self.remat_policy = vcfg, remat_policy
        self.patch_embed = normal_param(rngs, (vcfg.in_channels * vcfg.patch_size ** 2, vcfg.hidden_size),
                                        (None, "vit_embed"), std=std, dtype=pd)
        self.blocks = stack_modules(lambda r: VisionBlock(vcfg, attention_impl=attention_impl, std=std,
                                                          param_dtype=pd, rngs=r), vcfg.depth, rngs)
        self.final_norm = LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps, param_dtype=pd)

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array, *, dtype=jnp.float32) -> jax.Array:
        """pixel_values [N, C*p*p] with grid_thw [n, 3] -> [N, Hv]; or [B, P, C*p*p] with [B, n, 3] -> [B, P, Hv].

        dtype: compute dtype. Outputs at padding patches are meaningless (finite) and are to be ignored."""
        c = self.vcfg
        d_in = c.in_channels * c.patch_size ** 2
        pixel_values, grid_thw, flat = as_rows(pixel_values, grid_thw, "pixel_values")
        if pixel_values.shape[-1] != d_in:
            raise ValueError(f"pixel_values must be [N, {d_in}] or [B, P, {d_in}] (C*p*p = {c.in_channels}*"
                             f"{c.patch_size}^2); got shape {tuple(pixel_values.shape)}")
        check_grid(grid_thw, pixel_values.shape[1], c.spatial_merge_size)
        layout = patch_layout(jnp.asarray(grid_thw), pixel_values.shape[1], c.spatial_merge_size)
        mask = AttentionMask(causal=False, q_segment_ids=layout.segment_ids, kv_segment_ids=layout.segment_ids,
                             kv_valid=layout.valid)
        angles = vision_rope_angles(layout.coords, c.head_dim, c.rope_theta)  # [B, P, D/2]

        dt = jnp.dtype(dtype)
        x = dense(pixel_values.astype(dt), self.patch_embed[...].astype(dt))
        x = shard(x, _ACT)
        graphdef, state = nnx.split(self.blocks)

        def body(h, block_state):
            return nnx.merge(graphdef, block_state)(h, angles, mask), None

        x, _ = jax.lax.scan(remat(body, self.remat_policy), x, state)
        x = self.final_norm(x)
        return x[0] if flat else x
