"""Data pipeline: bit-deterministic, exactly-once across restarts and process-count changes (issue #6).

`make_pipeline(data_config, process_index=, process_count=)` is the entry point; see `pipeline.py`.
Interleaved text + images: `make_multimodal_pipeline(MultimodalDataConfig(...))`; see `multimodal/`.
The embedded toy corpora that feed them live apart, in `ernie_jax.synthetic`.
"""

from ernie_jax.data.config import DataConfig, DataConfigError, SourceConfig
from ernie_jax.data.multimodal import (MM_KEYS, MultimodalDataConfig, MultimodalPipelineIterator,
                                      make_multimodal_pipeline)
from ernie_jax.data.order import GlobalOrder
from ernie_jax.data.pipeline import KEYS, PipelineIterator, make_pipeline
from ernie_jax.data.sources import ArrayRecordSource, DataError, JsonlSource
from ernie_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

__all__ = ["ArrayRecordSource", "DataConfig", "DataConfigError", "DataError", "GlobalOrder", "JsonlSource", "KEYS",
           "MM_KEYS", "MultimodalDataConfig", "MultimodalPipelineIterator", "PipelineIterator",
           "SentencePieceTokenizer", "SourceConfig", "make_multimodal_pipeline", "make_pipeline",
           "train_sentencepiece"]
