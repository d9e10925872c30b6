"""Shared fixtures: a small text corpus (the embedded toy generator at reduced size) and its tokenizer."""

import sys
from pathlib import Path

import pytest

from ernie_jax.synthetic import text

# the suite runs with --import-mode=importlib: make the shared helpers (data_helpers.py) importable
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (1500 docs), heldout.jsonl (200), tokenizer.model (vocab 512)."""
    out = tmp_path_factory.mktemp("corpus")
    return text.generate(out, train_docs=1500, heldout_docs=200)
