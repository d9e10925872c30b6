"""Interleaved text + image records -> packed batches for the VL model (the text pipeline's guarantees).

`config.py` (`MultimodalDataConfig`), `document.py` (record -> tokens, patches, grids), `packing.py`
(first fit under token, patch and image budgets; the batch layout), `pipeline.py`
(`make_multimodal_pipeline`, the iterator).
"""

from ernie_jax.data.multimodal.config import MultimodalDataConfig
from ernie_jax.data.multimodal.pipeline import MM_KEYS, MultimodalPipelineIterator, make_multimodal_pipeline

__all__ = ["MM_KEYS", "MultimodalDataConfig", "MultimodalPipelineIterator", "make_multimodal_pipeline"]
