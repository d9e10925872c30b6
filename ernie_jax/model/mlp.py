"""SwiGLU feed-forward block: `down(act(gate(x)) * up(x))`."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.model.dense import dense
from ernie_jax.model.params import const_param, normal_param
from ernie_jax.sharding import shard

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class MLP(nnx.Module):
    """Weights wi_gate / wi_up [H, I], wo [I, H]; biases optional (`use_bias`)."""

    def __init__(self, hidden: int, width: int, *, act: str, use_bias: bool, std: float, param_dtype,
                 rngs: nnx.Rngs):
        self.act, self.use_bias = act, use_bias
        self.wi_gate = normal_param(rngs, (hidden, width), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.wi_up = normal_param(rngs, (hidden, width), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.wo = normal_param(rngs, (width, hidden), ("mlp", "embed"), std=std, dtype=param_dtype)
        if use_bias:
            self.bi_gate = const_param(0.0, (width,), ("mlp",), dtype=param_dtype)
            self.bi_up = const_param(0.0, (width,), ("mlp",), dtype=param_dtype)
            self.bo = const_param(0.0, (hidden,), ("embed",), dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, H] -> [B, S, H]."""
        dt = x.dtype
        gate = dense(x, self.wi_gate[...].astype(dt))  # 2-D matmuls: see model/dense.py
        up = dense(x, self.wi_up[...].astype(dt))
        if self.use_bias:
            gate, up = gate + self.bi_gate[...].astype(dt), up + self.bi_up[...].astype(dt)
        gate = checkpoint_name(shard(gate, ("act_batch", "act_length", "act_mlp")), "mlp_gate")
        up = checkpoint_name(shard(up, ("act_batch", "act_length", "act_mlp")), "mlp_up")
        out = dense(ACTIVATIONS[self.act](gate) * up, self.wo[...].astype(dt))
        if self.use_bias:
            out = out + self.bo[...].astype(dt)
        return checkpoint_name(shard(out, ("act_batch", "act_length", "act_embed")), "mlp_out")
