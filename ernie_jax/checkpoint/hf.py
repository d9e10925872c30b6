"""transformers checkpoints <-> our parameter tree: `from_pretrained` / `save_pretrained`.

`param_rules` is the rule table of a whole model (`rules.Rule`: each transformers key, per layer `{i}`, to a
path in our state with the transform both ways; vision / adapter rules from `hf_vision`); per-layer tensors
stack along the leading `layers` axis of the stack the layer belongs to. `rules.load_tensors` /
`rules.export_tensors` apply it. Loading checks every key and shape against the config before reading any
tensor and reports all problems at once; saving writes to a temporary directory and moves the files into
place, so an interrupted save leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ernie_jax.checkpoint.hf_vision import adapter_rules, vision_rules
from ernie_jax.checkpoint.rules import CheckpointError, Rule, export_tensors, hf_shapes, load_tensors, shape_problems
from ernie_jax.checkpoint.rules import identity as _ident
from ernie_jax.checkpoint.rules import transpose as _t
from ernie_jax.checkpoint.safetensors_io import SafetensorsFile, save_file, shard_groups
from ernie_jax.config import ConfigError, ErnieConfig
from ernie_jax.model.create import abstract_model
from ernie_jax.model.decoder import layer_segments
from ernie_jax.sharding import param_shardings, resolve_rules
from ernie_jax.sharding.rules import Rules

log = logging.getLogger(__name__)

_ARCHITECTURES = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
                  "ernie4_5_vl_moe": "Ernie4_5_VLMoeForConditionalGeneration"}
# MTP weights (21B / 300B checkpoints): transformers drops them; we load them when the config has MTP depths.
_MTP_PREFIX = "model.mtp_"


def _dense_layer_rules(c: ErnieConfig) -> list[tuple[str, tuple[str, ...], Callable, Callable]]:
    h, nq, nkv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def heads_in(n):  # q/k/v weight [n*d, H] <-> [H, n, d]
        return (lambda w: w.reshape(n, d, h).transpose(2, 0, 1), lambda p: p.transpose(1, 2, 0).reshape(n * d, h))

    def heads_bias(n):  # [n*d] <-> [n, d]
        return (lambda b: b.reshape(n, d), lambda p: p.reshape(n * d))

    rules = [
        ("input_layernorm.weight", ("input_norm", "scale"), _ident, _ident),
        ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), _ident, _ident),
        ("self_attn.q_proj.weight", ("attn", "wq"), *heads_in(nq)),
        ("self_attn.k_proj.weight", ("attn", "wk"), *heads_in(nkv)),
        ("self_attn.v_proj.weight", ("attn", "wv"), *heads_in(nkv)),
        # o_proj [H, nq*d] <-> [nq, d, H]
        ("self_attn.o_proj.weight", ("attn", "wo"), lambda w: w.T.reshape(nq, d, h), lambda p: p.reshape(nq * d, h).T),
    ]
    if c.use_bias:
        rules += [
            ("self_attn.q_proj.bias", ("attn", "bq"), *heads_bias(nq)),
            ("self_attn.k_proj.bias", ("attn", "bk"), *heads_bias(nkv)),
            ("self_attn.v_proj.bias", ("attn", "bv"), *heads_bias(nkv)),
            ("self_attn.o_proj.bias", ("attn", "bo"), _ident, _ident),
        ]
    return rules


def _mlp_rules(hf_prefix: str, ours_prefix: tuple[str, ...], use_bias: bool):
    rules = [(f"{hf_prefix}.gate_proj.weight", ours_prefix + ("wi_gate",), _t, _t),
             (f"{hf_prefix}.up_proj.weight", ours_prefix + ("wi_up",), _t, _t),
             (f"{hf_prefix}.down_proj.weight", ours_prefix + ("wo",), _t, _t)]
    if use_bias:
        rules += [(f"{hf_prefix}.gate_proj.bias", ours_prefix + ("bi_gate",), _ident, _ident),
                  (f"{hf_prefix}.up_proj.bias", ours_prefix + ("bi_up",), _ident, _ident),
                  (f"{hf_prefix}.down_proj.bias", ours_prefix + ("bo",), _ident, _ident)]
    return rules


def _moe_layer_rules(c: ErnieConfig):
    """Text-MoE layer (on-disk hub layout, which transformers 5 also writes): per-expert projections."""
    per_layer = [
        ("mlp.gate.weight", ("mlp", "router", "kernel"), _t, _t, None, True),  # [E, H] <-> [H, E]
        ("mlp.moe_statics.e_score_correction_bias", ("mlp", "router", "bias"), lambda b: b.reshape(-1),
         lambda p: p.reshape(1, -1), None, True),  # [1, E] <-> [E]
    ]
    per_layer += [(f"mlp.experts.{{e}}.{n}.weight", ("mlp", "experts", ours), _t, _t, c.moe_num_experts, False)
                  for n, ours in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo"))]
    if c.moe_num_shared_experts:
        per_layer += [(*r, None, False) for r in _mlp_rules("mlp.shared_experts", ("mlp", "shared"), c.use_bias)]
    return per_layer


def _vl_moe_layer_rules(c: ErnieConfig):
    """VL MoE layer, on-disk hub layout (ERNIE-4.5-VL `-PT`, which transformers 5 writes too): routers
    `gate.weight` (text) / `gate.weight_1` (vision) stored [H, E] (our layout), one correction bias [2, E]
    (row 0 text, row 1 vision), experts 0..E-1 text and E..2E-1 vision (narrower)."""
    e = c.moe_num_experts
    per_layer = []
    for pool, gate, row, offset in (("", "gate.weight", 0, 0), ("vision_", "gate.weight_1", 1, e)):
        per_layer += [(f"mlp.{gate}", ("mlp", f"{pool}router", "kernel"), _ident, _ident, None, True, 0, None),
                      ("mlp.moe_statics.e_score_correction_bias", ("mlp", f"{pool}router", "bias"), _ident, _ident,
                       None, True, 0, (row, 2))]
        per_layer += [(f"mlp.experts.{{e}}.{n}.weight", ("mlp", f"{pool}experts", ours), _t, _t, e, False, offset, None)
                      for n, ours in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo"))]
    if c.moe_num_shared_experts:
        per_layer += [(*r, None, False, 0, None) for r in _mlp_rules("mlp.shared_experts", ("mlp", "shared"),
                                                                      c.use_bias)]
    return per_layer


def param_rules(config: ErnieConfig) -> list[Rule]:
    """Every parameter of the model for `config`, with its transformers key(s)."""
    c = config
    rules = [Rule("model.embed_tokens.weight", ("embed",), _ident, _ident),
             Rule("model.norm.weight", ("final_norm", "scale"), _ident, _ident)]
    if not c.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head",), _t, _t))
    if c.model_type == "ernie4_5_moe" and c.use_bias:
        rules.append(Rule("lm_head.bias", ("lm_head_bias",), _ident, _ident))
    start = 0
    for s, (kind, n) in enumerate(layer_segments(c)):
        per_layer = [(*r, None, False, 0, None) for r in _dense_layer_rules(c)]
        if kind == "dense":
            per_layer += [(*r, None, False, 0, None) for r in _mlp_rules("mlp", ("mlp",), c.use_bias)]
        elif c.vision is not None:
            per_layer += _vl_moe_layer_rules(c)
        else:
            per_layer += [(*r, 0, None) for r in _moe_layer_rules(c)]
        layers = tuple(range(start, start + n))
        for hf, ours, to_ours, to_hf, experts, fp32, offset, row in per_layer:
            rules.append(Rule(f"model.layers.{{i}}.{hf}", ("decoder", "stacks", s, "layers") + ours, to_ours,
                              to_hf, layers, experts, fp32, offset, row))
        start += n
    if c.vision is not None:
        rules += vision_rules(c.vision, ("vision",)) + adapter_rules(("adapter",))
    for d in range(c.num_nextn_predict_layers):
        rules += [Rule(f"model.mtp_emb_norm.{d}.weight", ("mtp", d, "emb_norm", "scale"), _ident, _ident),
                  Rule(f"model.mtp_hidden_norm.{d}.weight", ("mtp", d, "hidden_norm", "scale"), _ident, _ident),
                  Rule(f"model.mtp_linear_proj.{d}.weight", ("mtp", d, "proj"), _t, _t)]  # [H, 2H] <-> [2H, H]
        per_layer = _dense_layer_rules(c) + _mlp_rules("mlp", ("mlp",), c.use_bias)
        rules += [Rule(f"model.mtp_block.{d}.{hf}", ("mtp", d, "layer") + ours, to_ours, to_hf)
                  for hf, ours, to_ours, to_hf in per_layer]
    return rules


# ------------------------------------------------------------------------------------------ loading
class _Checkpoint(Mapping):
    """HF key -> array of a checkpoint directory, each read from its safetensors file when asked."""

    def __init__(self, files: dict[str, SafetensorsFile]):
        self._files = files  # key -> the file holding it

    def __getitem__(self, key: str) -> np.ndarray:
        return self._files[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.shape(k) for k, f in self._files.items()}


def _open_checkpoint(path: str) -> _Checkpoint:
    """The tensors of `model.safetensors` or of the shards `model.safetensors.index.json` lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
        out = {}
        for k, fn in weight_map.items():
            if k not in files[fn].keys():
                raise CheckpointError(f"{index}: maps {k!r} to {fn}, which does not contain it")
            out[k] = files[fn]
        return _Checkpoint(out)
    if os.path.exists(single):
        f = SafetensorsFile(single)
        return _Checkpoint({k: f for k in f.keys()})
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _check_checkpoint(shapes: dict[str, tuple[int, ...]], config: ErnieConfig, expected: dict[str, tuple[int, ...]],
                      where: str) -> None:
    """Raises CheckpointError listing every missing / unexpected key and shape mismatch of `shapes`
    (the checkpoint's HF key -> shape) against `expected` (what the config implies)."""
    present = set(shapes)
    ignored = set()
    if not config.num_nextn_predict_layers:  # like transformers, drop MTP weights the model has no place for
        ignored |= {k for k in present if k.startswith(_MTP_PREFIX)}
    if c_tied := config.tie_word_embeddings:
        ignored |= {"lm_head.weight"} & present  # transformers re-ties it to the embedding
    if ignored:
        log.warning("%s: ignoring %d key(s) (as transformers does): %s", where, len(ignored), sorted(ignored)[:8])
    problems = shape_problems(expected, shapes)
    if unexpected := sorted(present - set(expected) - ignored):
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if problems:
        raise CheckpointError(f"{where} does not match its config ({config.model_type}, tied={c_tied}):\n  "
                              + "\n  ".join(problems))


def from_pretrained(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
                    mesh: Mesh | None = None, rules: Rules | str | None = None, config: ErnieConfig | None = None,
                    **config_overrides: Any):
    """Loads a transformers ERNIE-4.5 directory (`config.json` + safetensors) into our model.

    dtype: compute dtype; param_dtype: storage dtype of the parameters (default: `dtype`).
    With `mesh`, every parameter is placed sharded by `rules` (preset name or table) as it is read.
    `config`: build this config's model instead of the one config.json describes (a trainer initialising
    from a checkpoint; every key and shape is still checked). Reads safetensors directly: no torch.
    """
    path = os.fspath(path)
    if config is None:
        config = ErnieConfig.from_hf(path, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    elif config_overrides:
        raise TypeError(f"from_pretrained: pass either config or config overrides, not both: {sorted(config_overrides)}")
    tensors = _open_checkpoint(path)
    model = abstract_model(config)
    abs_state = nnx.state(model)
    prules = param_rules(config)
    shapes = tensors.shapes()
    _check_checkpoint(shapes, config, hf_shapes(prules, dict(nnx.to_flat_state(abs_state))), path)
    shardings = None
    if mesh is not None:
        shardings = {p: s.get_value() for p, s in
                     nnx.to_flat_state(param_shardings(abs_state, mesh, resolve_rules(rules or "fsdp")))}
    return load_tensors(model, prules, tensors, shapes=shapes, shardings=shardings)


# ------------------------------------------------------------------------------------------- saving
def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `config.json` and safetensors shards that `transformers.AutoModelForCausalLM.from_pretrained`
    loads. dtype: storage dtype of the written tensors (default: the parameters' dtype)."""
    config: ErnieConfig = model.config
    out_dir = os.fspath(out_dir)
    tensors = export_tensors(model, param_rules(config), dtype=dtype)
    saved_dtype = str(jnp.dtype(dtype or config.param_dtype))
    hf_config = {**config.to_hf(), "architectures": [_ARCHITECTURES[config.model_type]], "dtype": saved_dtype}

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ernie_jax_save_", dir=parent)
    try:
        groups = shard_groups(((k, tensors[k].nbytes) for k in sorted(tensors)), max_shard_bytes)
        if len(groups) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors" for j in range(len(groups))]
            index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                     "weight_map": {k: n for n, g in zip(names, groups) for k in g}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        for n, g in zip(names, groups):
            save_file({k: tensors[k] for k in g}, os.path.join(tmp, n), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        os.makedirs(out_dir, exist_ok=True)
        for old in os.listdir(out_dir):  # stale shards of an earlier save would confuse the loader
            if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".index.json")):
                os.remove(os.path.join(out_dir, old))
        for n in os.listdir(tmp):
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["CheckpointError", "ConfigError", "from_pretrained", "save_pretrained", "param_rules"]
