"""transformers keys <-> our parameters for the VL vision encoder (`VisionEncoder`) and adapter (`Adapter`).

Two spellings of the same tensors:
* "hub": the on-disk layout of the released checkpoints, which transformers 5 `save_pretrained` also writes
  (`model.vision_model.*`, `model.resampler_model.spatial_linear.{0,2,3}.*`);
* "memory": transformers' module names after its load-time renaming (`model.vision_tower.*`,
  `model.resampler_model.spatial_linear.{fc1,fc2,ln}.*`), i.e. `state_dict()` keys.
torch `nn.Linear` weights are [out, in]; ours are [in, ..., out] with the fused qkv split as [Hv, 3, N, D].
`rules.load_tensors` / `rules.export_tensors` apply these lists (the "memory" layout: to transformers modules
in memory, as the parity tests do).
"""

from __future__ import annotations

from typing import Callable

from ernie_jax.checkpoint.rules import Rule
from ernie_jax.checkpoint.rules import identity as _ident
from ernie_jax.checkpoint.rules import transpose as _t
from ernie_jax.config import VisionConfig

LAYOUTS = ("hub", "memory")
_VISION_PREFIX = {"hub": "model.vision_model", "memory": "model.vision_tower"}
_MERGE_LINEAR = {"hub": ("0", "2", "3"), "memory": ("fc1", "fc2", "ln")}  # fc1, fc2, LayerNorm
RESAMPLER_PREFIX = "model.resampler_model"


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown HF key layout {layout!r}; known: {LAYOUTS}")


def vision_rules(vcfg: VisionConfig, ours_prefix: tuple = ("vision",), *, layout: str = "hub") -> list[Rule]:
    """Every parameter of `VisionEncoder(vcfg)` under `ours_prefix`, with its transformers key(s)."""
    _check_layout(layout)
    hv, n, d = vcfg.hidden_size, vcfg.num_heads, vcfg.head_dim
    hf = _VISION_PREFIX[layout]
    per_block: list[tuple[str, tuple[str, ...], Callable, Callable]] = [
        ("norm1.weight", ("norm1", "scale"), _ident, _ident),
        ("norm1.bias", ("norm1", "bias"), _ident, _ident),
        ("norm2.weight", ("norm2", "scale"), _ident, _ident),
        ("norm2.bias", ("norm2", "bias"), _ident, _ident),
        # qkv [3*Hv, Hv], rows ordered (q|k|v, head, dim) <-> [Hv, 3, N, D]
        ("attn.qkv.weight", ("attn", "wqkv"), lambda w: w.reshape(3, n, d, hv).transpose(3, 0, 1, 2),
         lambda p: p.transpose(1, 2, 3, 0).reshape(3 * n * d, hv)),
        ("attn.qkv.bias", ("attn", "bqkv"), lambda b: b.reshape(3, n, d), lambda p: p.reshape(3 * n * d)),
        # proj [Hv, N*D] <-> [N, D, Hv]
        ("attn.proj.weight", ("attn", "wo"), lambda w: w.T.reshape(n, d, hv), lambda p: p.reshape(n * d, hv).T),
        ("attn.proj.bias", ("attn", "bo"), _ident, _ident),
        ("mlp.fc1.weight", ("mlp", "w1"), _t, _t),
        ("mlp.fc1.bias", ("mlp", "b1"), _ident, _ident),
        ("mlp.fc2.weight", ("mlp", "w2"), _t, _t),
        ("mlp.fc2.bias", ("mlp", "b2"), _ident, _ident),
    ]
    layers = tuple(range(vcfg.depth))
    rules = [Rule(f"{hf}.patch_embed.proj.weight", ours_prefix + ("patch_embed",), _t, _t),
             Rule(f"{hf}.ln.weight", ours_prefix + ("final_norm", "scale"), _ident, _ident),
             Rule(f"{hf}.ln.bias", ours_prefix + ("final_norm", "bias"), _ident, _ident)]
    rules += [Rule(f"{hf}.blocks.{{i}}.{k}", ours_prefix + ("blocks",) + ours, to_ours, to_hf, layers)
              for k, ours, to_ours, to_hf in per_block]
    return rules


def adapter_rules(ours_prefix: tuple = ("adapter",), *, layout: str = "hub") -> list[Rule]:
    """Every parameter of `Adapter(...)` under `ours_prefix`, with its transformers key."""
    _check_layout(layout)
    fc1, fc2, ln = _MERGE_LINEAR[layout]
    hf = RESAMPLER_PREFIX
    rules = []
    for hf_name, ours in (("spatial_linear", "spatial"), ("temporal_linear", "temporal")):
        p = ours_prefix + (ours,)
        rules += [Rule(f"{hf}.{hf_name}.{fc1}.weight", p + ("w1",), _t, _t),
                  Rule(f"{hf}.{hf_name}.{fc1}.bias", p + ("b1",), _ident, _ident),
                  Rule(f"{hf}.{hf_name}.{fc2}.weight", p + ("w2",), _t, _t),
                  Rule(f"{hf}.{hf_name}.{fc2}.bias", p + ("b2",), _ident, _ident),
                  Rule(f"{hf}.{hf_name}.{ln}.weight", p + ("norm", "scale"), _ident, _ident),
                  Rule(f"{hf}.{hf_name}.{ln}.bias", p + ("norm", "bias"), _ident, _ident)]
    rules += [Rule(f"{hf}.mlp.weight", ours_prefix + ("proj",), _t, _t),
              Rule(f"{hf}.mlp.bias", ours_prefix + ("proj_bias",), _ident, _ident),
              Rule(f"{hf}.after_norm.weight", ours_prefix + ("after_norm", "scale"), _ident, _ident)]
    return rules
