"""Calibration activations: the inputs each decoder projection sees on real data, and GPTQ's Hessians of them.

    xs = capture_inputs(model, batch)          # {(layer, "attn/wq"): x [T, K] of the batch's real tokens}
    hs = layer_hessians(model, batches)        # {(layer, rel_path): H [K, K] = mean x^T x}

One eager forward pass per batch (`jax.disable_jit`, so the layer scan runs as a Python loop and every
projection sees concrete arrays) through `model.dense.dense`, recorded at its call sites in the attention and
MLP modules. Every Hessian comes from the full-precision model's activations (one pass, not GPTQ's
layer-by-layer pass over already-quantized layers). The routed experts do not go through `dense` and get no
Hessian (they are rounded to nearest).
"""

from __future__ import annotations

import importlib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.quantization.gptq import HessianAccumulator

# the dense() calls of one attention / MLP block, in call order (ernie_jax.model re-exports a function named
# `attention`, so the modules are looked up by name)
_ATTENTION = ("attn/wq", "attn/wk", "attn/wv", "attn/wo")
_MLP = ("wi_gate", "wi_up", "wo")


def capture_inputs(model: nnx.Module, batch: dict) -> dict[tuple[int, str], np.ndarray]:
    """{(decoder layer, weight path in the layer): its input x [T, K] float32 on the batch's real tokens}.

    batch: "tokens" [B, S] (or "input_ids") and optionally "positions" [B, S] and "segment_ids" [B, S]
    (0 = padding, left out of x)."""
    attention_mod = importlib.import_module("ernie_jax.model.attention")
    mlp_mod = importlib.import_module("ernie_jax.model.mlp")
    config = model.config
    ids = jnp.asarray(batch["tokens"] if "tokens" in batch else batch["input_ids"])
    seg = batch.get("segment_ids")
    real = np.ones(ids.size, bool) if seg is None else np.asarray(seg).reshape(-1) > 0
    seen: dict[tuple[int, str], np.ndarray] = {}
    calls = {"attn": 0, "mlp": 0}
    layer = [-1]
    originals = {attention_mod: attention_mod.dense, mlp_mod: mlp_mod.dense}

    def recorder(mod, kind):
        def dense(x, w, n_in=1, **kw):
            if kind == "attn":
                if calls["attn"] % len(_ATTENTION) == 0:
                    layer[0] += 1
                name = _ATTENTION[calls["attn"] % len(_ATTENTION)]
            else:
                moe = config.moe_num_experts > 0 and config.is_moe_layer(layer[0])
                name = ("mlp/shared/" if moe else "mlp/") + _MLP[calls["mlp"] % len(_MLP)]
            calls[kind] += 1
            if 0 <= layer[0] < config.num_hidden_layers:  # the MTP block's calls come after the decoder's
                k = int(np.prod(w.shape[:n_in]))
                seen[(layer[0], name)] = np.asarray(x, np.float32).reshape(-1, k)[real]
            return originals[mod](x, w, n_in, **kw)
        return dense

    try:
        attention_mod.dense = recorder(attention_mod, "attn")
        mlp_mod.dense = recorder(mlp_mod, "mlp")
        with jax.disable_jit():
            model(ids, positions=None if "positions" not in batch else jnp.asarray(batch["positions"]),
                  segment_ids=None if seg is None else jnp.asarray(seg))
    finally:
        for mod, fn in originals.items():
            mod.dense = fn
    return seen


def layer_hessians(model: nnx.Module, batches: Iterable[dict]) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, weight path): H [K, K] float64}, the mean of x^T x over every real token of `batches`."""
    accs: dict[tuple[int, str], HessianAccumulator] = {}
    for batch in batches:
        for key, x in capture_inputs(model, batch).items():
            accs.setdefault(key, HessianAccumulator(x.shape[-1])).add(x)
    if not accs:
        raise ValueError("layer_hessians: no calibration batch was given")
    return {key: acc.hessian() for key, acc in accs.items()}
