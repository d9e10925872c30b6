"""`ErnieConfig`: one typed, validated config for the dense, MoE and VL ERNIE-4.5 models.

Field names follow `transformers` (`Ernie4_5Config`, `Ernie4_5_MoeConfig`, `Ernie4_5_VLMoeConfig`) so a
`config.json` maps onto it key for key; `from_hf` / `to_hf` convert in both directions. Fields that only
the MoE or VL models use stay at their "off" value (`moe_num_experts=0`, `vision=None`) for dense models.
Numerics and implementation switches (`dtype`, `param_dtype`, `attention_impl`, `remat_policy`) are ours
and are not written to `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
HIDDEN_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu", "quick_gelu")
ATTENTION_IMPLS = ("xla", "jax_nn", "flashmask")
MOE_DISPATCH = ("dropless", "capacity", "dense")
MROPE_RULES = ("hf", "baidu")  # position advance after an image / video, see ernie_jax.model.mrope
GMM_IMPLS = ("auto", "ragged_dot", "tiled", "bucketed", "pallas")
# Names accepted by `remat_policy`; see `ernie_jax.model.remat` for what each one saves.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv", "save_attn", "save_attn_mlp")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"ErnieConfig.{field}: {msg}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The adaptive-resolution ViT (`Ernie4_5_VLMoeVisionConfig`) and its adapter geometry."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                     "spatial_merge_size", "temporal_merge_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"VisionConfig.{name}: must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"VisionConfig.hidden_size: {self.hidden_size} is not divisible by "
                              f"num_heads={self.num_heads}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(f"VisionConfig.hidden_act: {self.hidden_act!r} not in {HIDDEN_ACTS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErnieConfig:
    """Architecture of an ERNIE-4.5 model plus how to run it.

    Dense models leave `moe_num_experts = 0`; text MoE models set the `moe_*` fields; VL models also set
    `vision` and the special token ids. `moe_intermediate_size` is `(text,)` or `(text, vision)`.
    """

    # --- text decoder (all families) ---
    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_bias: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    # --- mixture of experts (0 experts = dense) ---
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: tuple[int, ...] = ()
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1  # -1 -> num_hidden_layers - 1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    num_nextn_predict_layers: int = 0  # MTP depth

    # --- vision-language ---
    vision: VisionConfig | None = None
    mrope_section: tuple[int, int, int] = (22, 22, 20)
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307

    # --- numerics and implementation (not part of config.json) ---
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters (the fp32 master copy in training)
    attention_impl: str = "xla"
    remat_policy: str = "none"
    moe_dispatch: str = "dropless"  # see ernie_jax.model.moe
    moe_capacity_factor: float = 1.25  # capacity dispatch only
    moe_gmm_impl: str = "auto"  # grouped matmul of the dropless path, see ernie_jax.model.grouped_matmul
    moe_gmm_tile: int = 0  # rows per tile of the `tiled` grouped matmul and `bucketed`'s fallback (0 = from shapes)
    mrope_rule: str = "hf"  # VL 3D positions: "hf" (transformers) or "baidu" (Baidu's processor)
    # layer indices where a new scanned stack starts although the layer kind does not change (a quantization
    # scheme whose layout changes there: one stack holds one layout per weight)
    layer_stack_breaks: tuple[int, ...] = ()

    def __post_init__(self):
        if self.moe_layer_end_index == self.num_hidden_layers - 1:  # canonical "to the last layer" is -1
            object.__setattr__(self, "moe_layer_end_index", -1)
        if isinstance(self.moe_intermediate_size, int):  # accept a bare int like transformers does
            object.__setattr__(self, "moe_intermediate_size", (self.moe_intermediate_size,))
        else:
            object.__setattr__(self, "moe_intermediate_size", tuple(self.moe_intermediate_size))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        object.__setattr__(self, "layer_stack_breaks", tuple(self.layer_stack_breaks))
        if isinstance(self.vision, Mapping):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive int, got {v!r}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
               f"num_attention_heads={self.num_attention_heads} is not divisible by "
               f"num_key_value_heads={self.num_key_value_heads}")
        _check(self.head_dim % 2 == 0, "head_dim", f"RoPE rotates pairs, so head_dim must be even, got {self.head_dim}")
        _check(self.hidden_act in HIDDEN_ACTS, "hidden_act", f"{self.hidden_act!r} not in {HIDDEN_ACTS}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _check(self.dtype in DTYPES, "dtype", f"{self.dtype!r} not in {DTYPES}")
        _check(self.param_dtype in DTYPES, "param_dtype", f"{self.param_dtype!r} not in {DTYPES}")
        _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
               f"{self.attention_impl!r} not in {ATTENTION_IMPLS}")
        _check(self.remat_policy in REMAT_POLICIES, "remat_policy", f"{self.remat_policy!r} not in {REMAT_POLICIES}")
        _check(self.moe_dispatch in MOE_DISPATCH, "moe_dispatch", f"{self.moe_dispatch!r} not in {MOE_DISPATCH}")
        _check(self.moe_gmm_impl in GMM_IMPLS, "moe_gmm_impl", f"{self.moe_gmm_impl!r} not in {GMM_IMPLS}")
        _check(self.moe_capacity_factor > 0, "moe_capacity_factor", f"must be > 0, got {self.moe_capacity_factor}")
        _check(self.moe_gmm_tile >= 0, "moe_gmm_tile", f"must be >= 0, got {self.moe_gmm_tile}")
        _check(self.mrope_rule in MROPE_RULES, "mrope_rule", f"{self.mrope_rule!r} not in {MROPE_RULES}")
        b = self.layer_stack_breaks
        _check(list(b) == sorted(set(b)) and all(isinstance(i, int) and 0 < i < self.num_hidden_layers for i in b),
               "layer_stack_breaks", f"must be increasing layer indices in (0, num_hidden_layers="
               f"{self.num_hidden_layers}), got {b}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            _check(v is None or 0 <= v < self.vocab_size, name, f"{v} is outside [0, vocab_size={self.vocab_size})")
        _check(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        if self.moe_num_experts:
            _check(self.moe_num_experts > 0, "moe_num_experts", f"must be >= 0, got {self.moe_num_experts}")
            _check(0 < self.moe_k <= self.moe_num_experts, "moe_k",
                   f"top-k must be in [1, moe_num_experts={self.moe_num_experts}], got {self.moe_k}")
            n_pools = 2 if self.vision is not None else 1
            _check(len(self.moe_intermediate_size) == n_pools and all(w > 0 for w in self.moe_intermediate_size),
                   "moe_intermediate_size",
                   f"needs {n_pools} positive width(s) ({'text, vision' if n_pools == 2 else 'text'}), "
                   f"got {self.moe_intermediate_size}")
            _check(self.moe_num_shared_experts >= 0, "moe_num_shared_experts", "must be >= 0")
            _check(self.moe_layer_interval > 0, "moe_layer_interval", "must be > 0")
            _check(0 <= self.moe_layer_start_index < self.num_hidden_layers, "moe_layer_start_index",
                   f"{self.moe_layer_start_index} is outside [0, num_hidden_layers={self.num_hidden_layers})")
            _check(self.moe_layer_end_index == -1
                   or self.moe_layer_start_index <= self.moe_layer_end_index < self.num_hidden_layers,
                   "moe_layer_end_index", f"{self.moe_layer_end_index} is outside "
                   f"[moe_layer_start_index={self.moe_layer_start_index}, {self.num_hidden_layers})")
            _check(any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)), "moe_layer_interval",
                   "start/end/interval select no MoE layer")
        else:
            _check(self.vision is None, "moe_num_experts", "the VL model is a MoE: set moe_num_experts > 0")
        if self.vision is not None:
            _check(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2
                   and self.mrope_section[0] == self.mrope_section[1], "mrope_section",
                   f"must be 3 ints (h, w, t) with h == w (height and width pairs interleave) summing to "
                   f"head_dim/2={self.head_dim // 2}, got {self.mrope_section}")

    # ----------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        if self.vision is not None:
            return "ernie4_5_vl_moe"
        return "ernie4_5_moe" if self.moe_num_experts else "ernie4_5"

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, i: int) -> bool:
        """HF/Paddle rule: layer i is sparse iff (i+1) % interval == 0 and start <= i <= end."""
        if not self.moe_num_experts:
            return False
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= end

    def replace(self, **changes: Any) -> "ErnieConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"ErnieConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "ErnieConfig":
        """Reads a transformers `config.json` (a file, a directory holding one, or a dict).

        Accepts the current layout (`rope_parameters`) and the hub's legacy one (top-level `rope_theta`,
        `torch_dtype`, Paddle-only keys, which are ignored with a warning). A missing required key or an
        unknown `model_type` is an error naming it. `overrides` set our own numerics fields (`dtype`, ...).
        """
        src = "<dict>"
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            src = p
            try:
                with open(p) as f:
                    d = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"no config.json at {p}") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return _from_hf_dict(cls, d, src, overrides)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers 5.x writes for this architecture."""
        return _to_hf_dict(self)


# Keys that released checkpoints carry but transformers ignores (Paddle-side training settings).
_IGNORED_KEYS = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache", "moe_capacity",
    "moe_gate", "moe_use_aux_free", "output_router_logits", "_name_or_path", "use_flash_attention",
    "use_rmsnorm", "fuse_rms_norm", "fuse_attn_ffn", "compression_ratio", "freq_allocation", "rope_scaling",
    "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "weight_share_add_bias",
    "model_type", "rope_parameters", "rope_theta", "text_config", "vision_config", "initializer_range",
    "router_aux_loss_coef",  # transformers' training loss weight; ours is LossConfig.aux_coef
}
_TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_TEXT_OPTIONAL = ("num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "use_bias", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
                  "initializer_range")
_MOE_KEYS = ("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts",
             "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_norm_min",
             "num_nextn_predict_layers")
_MOE_ALIASES = {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"}
_VL_TOKENS = ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
              "video_start_token_id", "video_end_token_id")
_NUMERICS = ("dtype", "param_dtype", "attention_impl", "remat_policy", "moe_dispatch", "moe_capacity_factor",
             "moe_gmm_impl", "moe_gmm_tile", "mrope_rule", "layer_stack_breaks")


def _rope_theta(d: Mapping[str, Any], src: str) -> float:
    rp = d.get("rope_parameters") or d.get("rope_scaling")
    if isinstance(rp, Mapping):
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype not in ("default", None):
            raise ConfigError(f"{src}: rope_parameters.rope_type={rtype!r} is not supported (only 'default')")
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    if "rope_theta" in d:  # legacy hub layout
        return float(d["rope_theta"])
    return 500000.0  # transformers' default_theta for ERNIE 4.5


def _from_hf_dict(cls, d: dict[str, Any], src: str, overrides: Mapping[str, Any]) -> ErnieConfig:
    model_type = d.get("model_type")
    if model_type not in ("ernie4_5", "ernie4_5_moe", "ernie4_5_vl_moe"):
        raise ConfigError(f"{src}: model_type={model_type!r} is not an ERNIE 4.5 model "
                          "(expected ernie4_5, ernie4_5_moe or ernie4_5_vl_moe)")
    bad = set(overrides) - set(_NUMERICS)
    if bad:
        raise ConfigError(f"from_hf overrides may only set {_NUMERICS}, got {sorted(bad)}")
    text = dict(d["text_config"]) if model_type == "ernie4_5_vl_moe" else d
    if model_type == "ernie4_5_vl_moe" and "vision_config" not in d:
        raise ConfigError(f"{src}: VL config needs key 'vision_config'")
    missing = [k for k in _TEXT_REQUIRED if k not in text]
    if missing:
        raise ConfigError(f"{src}: missing required key(s) {missing}")
    kw: dict[str, Any] = {k: text[k] for k in _TEXT_REQUIRED}
    for k in _TEXT_OPTIONAL:
        if k in text and (text[k] is not None or k.endswith("_token_id")):  # VL text configs use None ids
            kw[k] = text[k]
    if kw.get("num_key_value_heads") is None:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    if "head_dim" not in kw:  # the MoE / VL configs have no head_dim field: hidden / heads
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    kw["rope_theta"] = _rope_theta(text, src)
    if "tie_word_embeddings" in d:  # the top-level flag wins for VL
        kw["tie_word_embeddings"] = d["tie_word_embeddings"]

    used = set(_TEXT_REQUIRED) | set(_TEXT_OPTIONAL) | {"num_nextn_predict_layers"}
    if text.get("num_nextn_predict_layers"):  # any family may carry an MTP block
        kw["num_nextn_predict_layers"] = text["num_nextn_predict_layers"]
    if model_type != "ernie4_5":
        for alias, name in _MOE_ALIASES.items():
            if alias in text and name not in text:
                text[name] = text[alias]
            used.add(alias)
        for k in _MOE_KEYS:
            if k in text:
                kw[k] = text[k]
        used |= set(_MOE_KEYS)
        kw.setdefault("moe_num_experts", 64)
        kw.setdefault("moe_k", 6)
        kw.setdefault("moe_num_shared_experts", 2)
        kw.setdefault("moe_intermediate_size", [1536, 512] if model_type == "ernie4_5_vl_moe" else 1536)
        if isinstance(kw["moe_num_experts"], (list, tuple)):  # Paddle-style [text, vision]
            if len(set(kw["moe_num_experts"])) != 1:
                raise ConfigError(f"{src}: moe_num_experts={kw['moe_num_experts']}: text and vision pools of "
                                  "different size are not supported")
            kw["moe_num_experts"] = kw["moe_num_experts"][0]
        if model_type == "ernie4_5_moe":
            kw.setdefault("moe_layer_start_index", 1)
            if isinstance(kw.get("moe_layer_start_index"), (list, tuple)) or isinstance(
                    kw.get("moe_layer_end_index"), (list, tuple)):
                raise ConfigError(f"{src}: per-modality moe_layer_start/end_index lists belong to VL configs")
    if model_type == "ernie4_5_vl_moe":
        kw.update(_vl_layer_types(text, kw["num_hidden_layers"], src))
        used.add("mlp_layer_types")
        rp = text.get("rope_parameters") or {}
        if "mrope_section" in rp:
            kw["mrope_section"] = tuple(rp["mrope_section"])
        v = dict(d["vision_config"])
        vkw = {k: v[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                 "patch_size", "spatial_merge_size", "temporal_merge_size", "hidden_act")
               if k in v}
        if "rms_norm_eps" in v:
            vkw["layer_norm_eps"] = v["rms_norm_eps"]
        vrp = v.get("rope_parameters") or {}
        if "rope_theta" in vrp:
            vkw["rope_theta"] = float(vrp["rope_theta"])
        kw["vision"] = VisionConfig(**vkw)
        for k in _VL_TOKENS:
            if k in d:
                kw[k] = d[k]
        used |= set(_VL_TOKENS)
    extra = sorted(k for k in text if k not in used and k not in _IGNORED_KEYS)
    if extra:
        log.warning("%s: ignoring config keys transformers does not use either: %s", src, extra)
    kw.update(overrides)
    try:
        return cls(**kw)
    except TypeError as e:  # a value of the wrong type
        raise ConfigError(f"{src}: {e}") from None


def _vl_layer_types(text: Mapping[str, Any], num_layers: int, src: str) -> dict[str, int]:
    """`mlp_layer_types` (HF VL) -> start/end/interval; an irregular pattern is an error."""
    types = text.get("mlp_layer_types") or (["dense"] + ["sparse"] * (num_layers - 1))
    if len(types) != num_layers:
        raise ConfigError(f"{src}: mlp_layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
    sparse = [i for i, t in enumerate(types) if t == "sparse"]
    if not sparse:
        raise ConfigError(f"{src}: mlp_layer_types has no 'sparse' layer")
    for interval in range(1, num_layers + 1):
        want = [i for i in range(sparse[0], sparse[-1] + 1) if (i + 1) % interval == 0]
        if want == sparse:
            return dict(moe_layer_start_index=sparse[0], moe_layer_end_index=sparse[-1],
                        moe_layer_interval=interval)
    raise ConfigError(f"{src}: mlp_layer_types {types} is not a start/end/interval pattern")


def _to_hf_dict(c: ErnieConfig) -> dict[str, Any]:
    text: dict[str, Any] = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, use_bias=c.use_bias,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, use_cache=True,
    )
    if c.model_type == "ernie4_5":
        text["head_dim"] = c.head_dim
        text["model_type"] = "ernie4_5"
        if c.num_nextn_predict_layers:  # the MTP block's weights are saved beside the model's
            text["num_nextn_predict_layers"] = c.num_nextn_predict_layers
        return text
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        # MoE / VL configs in transformers have no head_dim field but read it with getattr when present.
        text["head_dim"] = c.head_dim
    moe = dict(moe_num_experts=c.moe_num_experts, moe_k=c.moe_k, moe_num_shared_experts=c.moe_num_shared_experts,
               moe_norm_min=c.moe_norm_min, output_router_logits=False)
    if c.model_type == "ernie4_5_moe":
        end = c.num_hidden_layers - 1 if c.moe_layer_end_index == -1 else c.moe_layer_end_index
        text.update(moe, moe_intermediate_size=c.moe_intermediate_size[0],
                    moe_layer_start_index=c.moe_layer_start_index, moe_layer_end_index=end,
                    moe_layer_interval=c.moe_layer_interval, model_type="ernie4_5_moe")
        if c.num_nextn_predict_layers:
            text["num_nextn_predict_layers"] = c.num_nextn_predict_layers
        return text
    v = c.vision
    text.update(moe, moe_intermediate_size=list(c.moe_intermediate_size), model_type="ernie4_5_vl_moe_text",
                mlp_layer_types=["sparse" if c.is_moe_layer(i) else "dense" for i in range(c.num_hidden_layers)])
    text["rope_parameters"]["mrope_section"] = list(c.mrope_section)
    out = dict(
        model_type="ernie4_5_vl_moe", text_config=text, tie_word_embeddings=c.tie_word_embeddings,
        vision_config=dict(
            model_type="ernie4_5_vl_moe_vision", depth=v.depth, hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
            patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
            temporal_merge_size=v.temporal_merge_size, hidden_act=v.hidden_act, rms_norm_eps=v.layer_norm_eps,
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta}),
    )
    out.update({k: getattr(c, k) for k in _VL_TOKENS})
    return out
