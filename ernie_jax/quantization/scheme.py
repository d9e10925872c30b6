"""Quantization schemes: which decoder weights get which integer layout.

    scheme = get_scheme("w4a8")                     # a preset
    scheme = QuantScheme("mine", (WeightRule(("experts",), bits=2, group_size=64, layers=(7, 28)),
                                  WeightRule(TARGETS, bits=8)))
    scheme.layouts(config)                           # {(path, layer): Layout} of every weight it quantizes

A rule names weight *targets* of the decoder layers (attention projections, a dense layer's MLP, the routed
experts, the shared experts) and optionally a half-open range of decoder layer indices; the first rule that
matches a weight decides its layout, and a weight no rule matches stays in full precision. Embeddings, the LM
head, norms, routers and the MTP block are never quantized (the routers and head decide which token and
expert wins; the deployment recipe keeps them in 16 bits too).

Why not qwix's rules: qwix matches module paths and intercepts the matmuls a module's `__call__` makes. Our
decoder runs its layers as one scanned stack through `nnx.split` / `nnx.merge`, so a module path carries no
layer index (the per-layer WINT2 layout could not be written), and `qwix.quantize_model` intercepted nothing
in it (a PTQ run left the logits bit-identical). 2-bit codes and the grouped expert matmul are ours too.
"""

from __future__ import annotations

import dataclasses

from ernie_jax.config import ErnieConfig

# target -> the weights (relative to a decoder layer) it covers, and whether they exist in dense / MoE layers
TARGETS = ("attention", "mlp", "experts", "shared_experts")
TARGET_WEIGHTS = {
    "attention": ("attn/wq", "attn/wk", "attn/wv", "attn/wo"),
    "mlp": ("mlp/wi_gate", "mlp/wi_up", "mlp/wo"),
    "experts": ("mlp/experts/wi_gate", "mlp/experts/wi_up", "mlp/experts/wo"),
    "shared_experts": ("mlp/shared/wi_gate", "mlp/shared/wi_up", "mlp/shared/wo"),
}
BITS = (8, 4, 2)
METHODS = ("rtn", "gptq")


class SchemeError(ValueError):
    """A scheme that cannot be applied; the message names the scheme, the rule and the value."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one weight is stored: `bits`-bit codes, one scale (and zero when asymmetric) per `group_size` rows
    of K (None: one group per column), and `activation_bits` (None: weight-only; 8: per-token int8 inputs)."""
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    activation_bits: int | None = None

    def name(self) -> str:
        g = "" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{g}a{self.activation_bits or 16}{'' if self.symmetric else '-asym'}"


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """targets: names from TARGETS; layers: [start, stop) decoder layer indices, None for all."""
    targets: tuple[str, ...]
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    activation_bits: int | None = None
    layers: tuple[int, int] | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.bits, self.group_size, self.symmetric, self.activation_bits)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A named list of rules (first match wins) and how codes are chosen: "rtn" (round to nearest) or "gptq"
    (error-compensating, needs calibration activations: `ernie_jax.quantization.gptq`)."""
    name: str
    rules: tuple[WeightRule, ...]
    method: str = "rtn"

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.method not in METHODS:
            raise SchemeError(f"scheme {self.name!r}: method={self.method!r} is not one of {METHODS}")
        if not self.rules:
            raise SchemeError(f"scheme {self.name!r}: no rules")
        for i, r in enumerate(self.rules):
            where = f"scheme {self.name!r} rule {i}"
            unknown = [t for t in r.targets if t not in TARGETS]
            if unknown or not r.targets:
                raise SchemeError(f"{where}: targets {list(r.targets)} must be a non-empty subset of {TARGETS}")
            if r.bits not in BITS:
                raise SchemeError(f"{where}: bits={r.bits} is not supported (one of {BITS})")
            if r.group_size is not None and (r.group_size <= 0 or r.group_size % (8 // r.bits)):
                raise SchemeError(f"{where}: group_size={r.group_size} must be positive and a multiple of "
                                  f"{8 // r.bits} ({r.bits}-bit codes pack {8 // r.bits} per byte)")
            if r.activation_bits not in (None, 8):
                raise SchemeError(f"{where}: activation_bits={r.activation_bits} must be None or 8")
            if r.layers is not None and not (len(r.layers) == 2 and 0 <= r.layers[0] < r.layers[1]):
                raise SchemeError(f"{where}: layers={r.layers} must be a range (start, stop) with 0 <= start < stop")

    def layout(self, target: str, layer: int) -> Layout | None:
        for r in self.rules:
            if target in r.targets and (r.layers is None or r.layers[0] <= layer < r.layers[1]):
                return r.layout
        return None

    def check(self, config: ErnieConfig) -> None:
        """SchemeError when a rule names layers the model does not have, or a target none of its layers
        holds (experts in a dense model)."""
        n = config.num_hidden_layers
        present = {"attention", "mlp"} if not config.moe_num_experts else {"attention"}
        if config.moe_num_experts:
            moe = [i for i in range(n) if config.is_moe_layer(i)]
            if len(moe) < n:
                present.add("mlp")
            present.add("experts")
            if config.moe_num_shared_experts:
                present.add("shared_experts")
        for i, r in enumerate(self.rules):
            if r.layers is not None and r.layers[1] > n:
                raise SchemeError(f"scheme {self.name!r} rule {i}: layers {list(r.layers)} reach past the model's "
                                  f"{n} decoder layers")
            if not any(t in present for t in r.targets):
                raise SchemeError(f"scheme {self.name!r} rule {i}: targets {list(r.targets)}: the model has none "
                                  f"of them (it has {sorted(present)})")

    def layouts(self, config: ErnieConfig) -> dict[tuple[str, int], Layout]:
        """{(weight path in a layer, e.g. "attn/wq", layer index): Layout} of every quantized weight."""
        self.check(config)
        out = {}
        for layer in range(config.num_hidden_layers):
            moe = config.moe_num_experts > 0 and config.is_moe_layer(layer)
            targets = ("attention", "experts") + (("shared_experts",) if config.moe_num_shared_experts else ()) \
                if moe else ("attention", "mlp")
            for t in targets:
                lay = self.layout(t, layer)
                if lay is not None:
                    out.update({(w, layer): lay for w in TARGET_WEIGHTS[t]})
        return out

    def stack_breaks(self, config: ErnieConfig) -> tuple[int, ...]:
        """Layer indices where the layout of some weight changes between consecutive layers of the same kind:
        the scanned stacks must split there (a stack holds one layout per weight)."""
        lay = self.layouts(config)
        breaks = []
        for i in range(1, config.num_hidden_layers):
            same_kind = (config.moe_num_experts > 0 and config.is_moe_layer(i)) == \
                (config.moe_num_experts > 0 and config.is_moe_layer(i - 1))
            names = {w for w, layer in lay if layer in (i, i - 1)}
            if same_kind and any(lay.get((w, i)) != lay.get((w, i - 1)) for w in names):
                breaks.append(i)
        return tuple(breaks)


_ALL = TARGETS
PRESETS: dict[str, QuantScheme] = {
    # weight-only
    "w8a16": QuantScheme("w8a16", (WeightRule(_ALL, bits=8),)),
    "w4a16": QuantScheme("w4a16", (WeightRule(_ALL, bits=4, group_size=128),)),
    "w2a16": QuantScheme("w2a16", (WeightRule(_ALL, bits=2, group_size=64, symmetric=False),)),
    # weights and per-token int8 activations
    "w8a8": QuantScheme("w8a8", (WeightRule(_ALL, bits=8, activation_bits=8),)),
    # the report's deployment: routed experts int4 (a dense model's MLP in their place), the rest int8
    "w4a8": QuantScheme("w4a8", (WeightRule(("experts", "mlp"), bits=4, activation_bits=8),
                                 WeightRule(("attention", "shared_experts"), bits=8, activation_bits=8))),
    # FastDeploy's WINT2 for ERNIE-4.5-21B-A3B / 300B: experts of layers 0-6 int4 per channel, experts of the
    # later layers 2-bit in groups of 64, every other projection int8
    "wint2": QuantScheme("wint2", (WeightRule(("experts",), bits=4, layers=(0, 7)),
                                   WeightRule(("experts",), bits=2, group_size=64, symmetric=False),
                                   WeightRule(("attention", "mlp", "shared_experts"), bits=8))),
}


def get_scheme(name: str, *, method: str | None = None, wint2_int4_layers: int | None = None) -> QuantScheme:
    """A preset by name; `method` overrides its code choice ("rtn" / "gptq"); `wint2_int4_layers` moves WINT2's
    int4 / 2-bit boundary (7 in the released layout) for models with fewer layers."""
    if name not in PRESETS:
        raise SchemeError(f"unknown quantization scheme {name!r}; presets: {sorted(PRESETS)}")
    s = PRESETS[name]
    if wint2_int4_layers is not None:
        if name != "wint2":
            raise SchemeError(f"wint2_int4_layers applies to the 'wint2' scheme, not {name!r}")
        if wint2_int4_layers < 1:
            raise SchemeError(f"wint2_int4_layers must be >= 1, got {wint2_int4_layers}")
        rules = list(s.rules)
        rules[0] = dataclasses.replace(rules[0], layers=(0, wint2_int4_layers))
        s = dataclasses.replace(s, rules=tuple(rules))
    return s if method is None else dataclasses.replace(s, method=method)
