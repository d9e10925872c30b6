"""Quantized matmul, dense and grouped over MoE experts, as Pallas TPU kernels (inference: forward only).

    from pallas_kernels.qmm import quantize, quantize_stack, quantized_matmul, quantized_gmm
    qt = quantize(w, bits=4, group_size=128)                        # w [K, N] -> packed codes + scales
    y = quantized_matmul(x, qt)                                     # [M, K] x [K, N] -> [M, N], weight-only
    y = quantized_matmul(x, quantize(w, 8), activation_bits=8)      # W8A8: per-token int8 x, per-channel w
    qts = quantize_stack(w_experts, bits=4, group_size=128)         # [G, K, N] -> a stack
    y = quantized_gmm(lhs, qts, group_sizes)                        # rows sorted by group, as pallas_kernels.gmm

- `format`: the weight format (`QuantizedTensor`: uint8 codes [K * bits / 8, N] packed in planes inside each
  group, fp32 scales and, asymmetric, zeros [K / group_size, N]); `quantize` (round to nearest), `dequantize`,
  `pack` / `unpack`; bits 8, 4, 2, per-channel or grouped, symmetric or asymmetric.
- `quantized_matmul` / `quantized_gmm`: the packed codes stream from HBM and are unpacked in VMEM with shifts
  and masks. activation_bits=None multiplies bf16 / fp32 x by the dequantized tile; activation_bits=8 rounds x
  per token to int8 and runs int8 x int8 dots with int32 accumulation per group. fp32 accumulation, tiles from
  `choose_tiling` unless given; `quantized_gmm` takes `group_offset` for expert parallelism.
- `interpret=None` picks the Mosaic kernel when lowering for TPU (AOT from a CPU host included) and the Pallas
  interpreter elsewhere (`pallas_kernels.target`).
- Oracles in `reference` (the dequantized weight at HIGHEST precision; `jax.lax.ragged_dot` for the grouped).
"""

from pallas_kernels.qmm.format import QuantizedTensor, dequantize, quantize
from pallas_kernels.qmm.ops import (choose_tiling, quantize_activations, quantize_stack, quantized_gmm,
                                    quantized_matmul, stack)

__all__ = ["QuantizedTensor", "choose_tiling", "dequantize", "quantize", "quantize_activations", "quantize_stack",
           "quantized_gmm", "quantized_matmul", "stack"]
