"""TPU ahead-of-time compile tier for a quantized model: the forward of a W4A8 tiny MoE (`quantize_model`),
lowered for one chip of a virtual `v5p:2x2x1` slice from this CPU host (libtpu, no TPU), runs every quantized
projection through the Pallas kernels: `quantized_matmul` for the attention, dense-layer MLP and shared-expert
projections and `quantized_gmm` for the routed experts (`QuantizedWeight` picks them when lowering for TPU,
where the CPU lowering dequantizes into XLA matmuls)."""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see test_model_aot.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from ernie_jax.model import create_model  # noqa: E402
from ernie_jax.presets import get_preset  # noqa: E402
from ernie_jax.quantization.model import quantize_model  # noqa: E402
from ernie_jax.quantization.scheme import get_scheme  # noqa: E402
from tpu_topology import libtpu_missing, virtual_tpu_devices  # noqa: E402

_MISSING = libtpu_missing()
pytestmark = [pytest.mark.tpu_aot, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

# experiments/configs/tiny_moe.py's model (`tiny` with 8 routed experts of width 128 and a shared one from layer
# 1 on) cut to 2 layers: one dense, one MoE
CFG = get_preset("tiny", num_hidden_layers=2, moe_num_experts=8, moe_k=2, moe_intermediate_size=(128,),
                 moe_num_shared_experts=1, moe_layer_start_index=1, dtype="bfloat16")


def test_w4a8_forward_runs_every_projection_through_the_quantized_kernels():
    q = quantize_model(create_model(CFG, seed=0), get_scheme("w4a8"))
    graphdef, state = nnx.split(q)
    chip = jax.sharding.SingleDeviceSharding(virtual_tpu_devices("v5p:2x2x1")[0])  # Mosaic is not partitioned
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    with jax.default_matmul_precision(None):  # as in serving (tests/conftest.py sets "highest")
        lowered = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).logits, in_shardings=chip,
                          out_shardings=chip).lower(abstract, ids)
        compiled = lowered.compile()
    hlo = compiled.as_text()
    layers, moe = CFG.num_hidden_layers, CFG.num_hidden_layers - 1
    # per layer 4 attention projections; the dense layer's MLP 3; per MoE layer 3 shared-expert projections
    # and 3 grouped expert matmuls
    assert hlo.count('custom_call_target="tpu_custom_call"') == 4 * layers + 3 + 6 * moe
