"""`ErnieVLForConditionalGeneration`: the ERNIE-4.5-VL model (transformers'
`Ernie4_5_VLMoeForConditionalGeneration`).

    input_ids -> embeddings; images / videos -> ViT (`vision.VisionEncoder`) -> adapter (`adapter.Adapter`)
    -> their LM tokens replace the placeholder embeddings; 3D RoPE positions (`mrope.rope_index`);
    the text decoder with modality-isolated experts (`moe.MoEBlock` routes by `moe_mm_token_type_ids`);
    final norm, tied / untied head.

The decoder, embedding and head are `ErnieForCausalLM`'s (same parameter paths, so the trainer, the
sharding rules and the router-bias update treat both alike); `vision` and `adapter` are added.

Inputs are the transformers processor's (`ernie_jax.processor` builds the same), in one of two layouts:
- flat (transformers): `pixel_values [N, C*p*p]`, `image_grid_thw [n, 3]`; the images of the whole batch in
  order, their LM tokens fill the image placeholders in row-major order over the batch;
- per row (our training pipeline, shards over the batch): `pixel_values [B, P, C*p*p]`,
  `image_grid_thw [B, n, 3]`; row b's images fill row b's placeholders. All-zero grid rows and patches
  past a row's images are padding.
Videos likewise (`pixel_values_videos`, `video_grid_thw`). Shapes are static, grids may be traced: the
model jits once per shape. With concrete inputs, placeholder counts are checked against the grids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ErnieConfig
from ernie_jax.model.adapter import Adapter
from ernie_jax.model.lm import CausalLMOutput, ErnieForCausalLM
from ernie_jax.model.mrope import mrope_angles, rope_index
from ernie_jax.model.vision import VisionEncoder


class ErnieVLForConditionalGeneration(ErnieForCausalLM):
    def __init__(self, config: ErnieConfig, *, rngs: nnx.Rngs):
        if config.vision is None:
            raise ValueError("ErnieVLForConditionalGeneration needs a config with `vision` set")
        super().__init__(config, rngs=rngs)
        c = config
        self.vision = VisionEncoder(c.vision, param_dtype=c.param_dtype, rngs=rngs, attention_impl=c.attention_impl,
                                    remat_policy=c.remat_policy, std=c.initializer_range)
        self.adapter = Adapter(c.vision, c.hidden_size, c.rms_norm_eps, param_dtype=c.param_dtype, rngs=rngs,
                               std=c.initializer_range)

    def __call__(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                 image_grid_thw: jax.Array | None = None, pixel_values_videos: jax.Array | None = None,
                 video_grid_thw: jax.Array | None = None, mm_token_type_ids: jax.Array | None = None,
                 moe_mm_token_type_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, mtp_input_ids: jax.Array | None = None) -> CausalLMOutput:
        """input_ids [B, S] int -> CausalLMOutput (MoE statistics with a [2] text/vision axis per layer).

        mm_token_type_ids [B, S]: 0 text, 1 image, 2 video placeholder (positions); derived from input_ids
          when None. moe_mm_token_type_ids [B, S]: the same plus start/end tokens (expert routing); None
          routes every token to the text experts, as transformers does.
        position_ids: [3, B, S] (t, h, w), [4, B, S] (transformers' packed form: a text row first) or [B, S];
          default `rope_index` per `config.mrope_rule` when images / videos are given, else 0..S-1
          (restarting per segment when segment_ids are given). `positions` [B, S] is the text models' name.
        segment_ids [B, S]: packed documents (attention and positions stay within a document).
        attention_mask [B, S]: 1 for real tokens, 0 for padding.
        """
        c = self.config
        if position_ids is None and positions is not None:
            position_ids = positions
        x, position_ids, _ = self.embed_inputs(
            input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask, segment_ids=segment_ids,
            position_ids=position_ids)
        angles = mrope_angles(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        return self._decode(x, angles, segment_ids=segment_ids, attention_mask=attention_mask,
                            mtp_input_ids=mtp_input_ids, modality=moe_mm_token_type_ids)

    def embed_inputs(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                     image_grid_thw: jax.Array | None = None, pixel_values_videos: jax.Array | None = None,
                     video_grid_thw: jax.Array | None = None, mm_token_type_ids: jax.Array | None = None,
                     attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     position_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """The decoder's inputs (arguments as in `__call__`): embeddings [B, S, H] with the images' and videos'
        adapter tokens in their placeholders, 3D position ids [3, B, S], and rope_deltas [B, 1] (transformers'
        max position + 1 - attended tokens; None when position_ids are given). Decoding continues from the last
        prompt token's position + 1 (`inference.decode`), which differs from index + rope_delta after a video
        whose temporal extent reaches past the text after it (mrope rule "hf")."""
        c = self.config
        b, s = input_ids.shape
        if mm_token_type_ids is None:
            mm_token_type_ids = (jnp.where(input_ids == c.image_token_id, 1, 0)
                                 + jnp.where(input_ids == c.video_token_id, 2, 0))
        x = self._embed(input_ids)
        for pix, grid, token_id, what in ((pixel_values, image_grid_thw, c.image_token_id, "image"),
                                          (pixel_values_videos, video_grid_thw, c.video_token_id, "video")):
            if pix is None:
                continue
            if grid is None:
                raise ValueError(f"{what} pixel values given without their grid_thw")
            feats, valid = self.adapter(self.vision(pix, grid, dtype=c.dtype), grid)
            x = _fill_placeholders(x, input_ids == token_id, feats.astype(x.dtype), valid, what)
        deltas = None
        if position_ids is None:
            if image_grid_thw is not None or video_grid_thw is not None:
                flat = lambda g: None if g is None else jnp.reshape(jnp.asarray(g), (-1, 3))  # noqa: E731
                position_ids, deltas = rope_index(mm_token_type_ids, flat(image_grid_thw), flat(video_grid_thw),
                                                  attention_mask, segment_ids,
                                                  spatial_merge_size=c.vision.spatial_merge_size,
                                                  temporal_merge_size=c.vision.temporal_merge_size,
                                                  rule=c.mrope_rule)
            else:  # transformers' default for text: 0..S-1 (padding not skipped)
                position_ids, deltas = rope_index(jnp.zeros((b, s), jnp.int32), None, None, None, segment_ids)
        return x, _as_3d(jnp.asarray(position_ids), b, s), deltas


def _as_3d(position_ids: jax.Array, b: int, s: int) -> jax.Array:
    if position_ids.shape == (b, s):
        return jnp.broadcast_to(position_ids[None], (3, b, s))
    if position_ids.shape in ((3, b, s), (4, b, s)):
        return position_ids[-3:]  # the packed 4-row form puts text positions first
    raise ValueError(f"position_ids must be [B, S], [3, B, S] or [4, B, S] with B={b}, S={s}; "
                     f"got {tuple(position_ids.shape)}")


def _fill_placeholders(x: jax.Array, is_ph: jax.Array, feats: jax.Array, valid: jax.Array, what: str) -> jax.Array:
    """The k-th placeholder (per row for per-row feats [B, F, H], over the whole batch in row-major order for
    flat feats [F, H]) takes the k-th adapter token. x [B, S, H], is_ph [B, S] bool, valid [(B,) F]."""
    b, s, h = x.shape
    flat = feats.ndim == 2
    if flat:
        x, is_ph, feats, valid = x.reshape(1, b * s, h), is_ph.reshape(1, b * s), feats[None], valid[None]
    if feats.shape[0] != x.shape[0]:
        raise ValueError(f"per-row {what} features for {feats.shape[0]} rows, but the batch has {x.shape[0]}")
    if not any(isinstance(a, jax.core.Tracer) for a in (is_ph, valid)):
        n_ph, n_ft = np.asarray(is_ph).sum(axis=1), np.asarray(valid).sum(axis=1)
        for r in np.nonzero(n_ph != n_ft)[0]:
            where = "the batch" if flat else f"row {r}"
            raise ValueError(f"{what} placeholders and {what} features do not match in {where}: "
                             f"{n_ph[r]} placeholder tokens, {n_ft[r]} {what} tokens from the grids")
    idx = jnp.clip(jnp.cumsum(is_ph, axis=1) - 1, 0, feats.shape[1] - 1)
    picked = jnp.take_along_axis(feats, idx[..., None], axis=1)
    out = jnp.where(is_ph[..., None], picked, x)
    return out.reshape(b, s, h) if flat else out
