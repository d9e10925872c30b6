"""Data pipeline: bit-deterministic, exactly-once across restarts and process-count changes (issue #6).

`make_pipeline(data_config, process_index=, process_count=)` is the entry point; see `pipeline.py`.
"""

from ernie_jax.data.config import DataConfig, DataConfigError, SourceConfig
from ernie_jax.data.order import GlobalOrder
from ernie_jax.data.pipeline import KEYS, PipelineIterator, make_pipeline
from ernie_jax.data.sources import ArrayRecordSource, DataError, JsonlSource
from ernie_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

__all__ = ["ArrayRecordSource", "DataConfig", "DataConfigError", "DataError", "GlobalOrder", "JsonlSource", "KEYS",
           "PipelineIterator", "SentencePieceTokenizer", "SourceConfig", "make_pipeline", "train_sentencepiece"]
