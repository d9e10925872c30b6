"""Analytic training FLOPs per token and MFU.

Per token, forward: 2 x (active matmul parameters: attention projections, dense or shared + top-k routed
expert FFNs, routers, the LM head; the embedding lookup is free) + attention scores and values
2 x 2 x S x Hq x D per layer, halved for causal masking. Training = 3 x forward (backward = 2 x forward);
remat recomputation is not counted (as MaxText). MTP depths count as extra dense layers plus the head.
"""

from __future__ import annotations

import jax

from ernie_jax.config import ErnieConfig

# Dense bf16 peak TFLOP/s per chip. CPU has no fixed peak: the trainer measures one (see `measure_peak`).
PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5": 459, "TPU v5p": 459,
               "TPU v6 lite": 918, "TPU v6e": 918, "NVIDIA H100": 989, "NVIDIA H200": 989, "NVIDIA A100": 312}


def flops_per_token(c: ErnieConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward)."""
    h, d = c.hidden_size, c.head_dim
    attn_proj = h * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    dense_ffn = 3 * h * c.intermediate_size
    moe_ffn = 0
    if c.is_moe:
        w = c.moe_intermediate_size[0]
        moe_ffn = 3 * h * w * (c.moe_k + c.moe_num_shared_experts) + h * c.moe_num_experts
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    n_dense = c.num_hidden_layers - n_moe + c.num_nextn_predict_layers
    matmul = (c.num_hidden_layers + c.num_nextn_predict_layers) * attn_proj + n_dense * dense_ffn \
        + n_moe * moe_ffn + (1 + c.num_nextn_predict_layers) * h * c.vocab_size \
        + c.num_nextn_predict_layers * 2 * h * h
    attention = (c.num_hidden_layers + c.num_nextn_predict_layers) * 2 * seq_len * c.num_attention_heads * d / 2
    return 3 * 2 * (matmul + attention)


def device_peak_tflops(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return float(peak)
    return None


def measure_peak_tflops(n: int = 1024, repeats: int = 5) -> float:
    """The achieved TFLOP/s of an n^3 fp32 matmul on the default device: a stand-in peak for CPUs."""
    import time

    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12
