"""Shared fixture: a small text corpus (the embedded generator at reduced size) and its tokenizer."""

from pathlib import Path

import pytest

from ernie_jax.synthetic import text


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (1500 docs), heldout.jsonl (200), tokenizer.model (vocab 512)."""
    return text.generate(tmp_path_factory.mktemp("corpus"), train_docs=1500, heldout_docs=200)
