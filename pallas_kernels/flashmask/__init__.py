"""FlashMask attention (Paddle's column-wise sparse masks) as Pallas TPU kernels: forward + backward with
fully-masked tiles skipped, a custom_vjp op, mask builders and a dense oracle."""

from pallas_kernels.flashmask.masks import (bidirectional_document_mask, causal_blockwise_mask,
                                            causal_document_mask, global_sliding_window_mask, prefix_lm_mask,
                                            segment_bounds, shared_question_mask, sliding_window_mask)
from pallas_kernels.flashmask.ops import (canonical_bounds, choose_blocks, flashmask_attention, tile_statistics,
                                          validate_indices)
from pallas_kernels.flashmask.reference import dense_mask, flashmask_attention_reference

__all__ = [
    "bidirectional_document_mask", "canonical_bounds", "causal_blockwise_mask", "causal_document_mask",
    "choose_blocks", "dense_mask", "flashmask_attention", "flashmask_attention_reference",
    "global_sliding_window_mask", "prefix_lm_mask", "segment_bounds", "shared_question_mask",
    "sliding_window_mask", "tile_statistics", "validate_indices",
]
