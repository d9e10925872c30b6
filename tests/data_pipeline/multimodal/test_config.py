"""MultimodalDataConfig: the special token ids as one `SpecialTokens` (from the model, a dict or the dataclass),
validation with clear errors, and a fingerprint that covers the ids and stays what it was when they were
six flat fields (saved pipeline states keep restoring)."""

import dataclasses
import hashlib
import json
import os

import pytest

from ernie_jax.data import DataConfigError, MultimodalDataConfig, SourceConfig
from ernie_jax.presets import get_preset
from ernie_jax.processor import SpecialTokens

TOKENS = dict(image_token_id=512, image_start_token_id=513, image_end_token_id=514, video_token_id=515,
              video_start_token_id=516, video_end_token_id=517)  # tiny-vl's
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "..", "data", "default", "tokenizer.model")


@pytest.fixture()
def source(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text("{}\n")
    return str(p)


def _cfg(source, **kw):
    return MultimodalDataConfig(**{"sources": (SourceConfig(path=source),), "tokenizer": TOKENIZER,
                                   "special": SpecialTokens(**TOKENS), **kw})


def test_special_from_a_dict_or_the_model(source):
    a = _cfg(source)
    assert a.special == SpecialTokens(**TOKENS)
    assert _cfg(source, special=dict(TOKENS)) == a  # a dict becomes the dataclass
    d = {"sources": [source], "tokenizer": TOKENIZER, "special": dict(TOKENS), "seq_len": 64}
    assert MultimodalDataConfig.from_dict(d) == a.replace(seq_len=64)
    model = get_preset("tiny-vl")
    m = MultimodalDataConfig.from_model_config(model, sources=[source], tokenizer=TOKENIZER, seq_len=64)
    assert m.special == SpecialTokens(**{k: getattr(model, k) for k in TOKENS})
    assert (m.patch_size, m.spatial_merge_size) == (model.vision.patch_size, model.vision.spatial_merge_size)


def test_bad_special_ids_are_clear_errors(source):
    with pytest.raises(DataConfigError, match="distinct"):
        _cfg(source, special=dict(TOKENS, image_token_id=513))
    with pytest.raises(DataConfigError, match=">= 0"):
        _cfg(source, special=dict(TOKENS, video_end_token_id=-1))
    with pytest.raises(DataConfigError, match=r"special: unknown keys \['image_id'\], missing keys "
                                              r"\['image_token_id'\]"):
        _cfg(source, special={**{k: v for k, v in TOKENS.items() if k != "image_token_id"}, "image_id": 5})
    with pytest.raises(DataConfigError, match="special must be a SpecialTokens or a dict"):
        _cfg(source, special=[512, 513])
    flat = {"sources": [source], "tokenizer": TOKENIZER, **TOKENS}
    with pytest.raises(DataConfigError, match=r"\['image_end_token_id', .*go under 'special'"):
        MultimodalDataConfig.from_dict(flat)
    with pytest.raises(DataConfigError, match="go under 'special'"):
        MultimodalDataConfig.from_model_config(get_preset("tiny-vl"), sources=[source], tokenizer=TOKENIZER,
                                               image_token_id=7)
    with pytest.raises(DataConfigError, match="no vision config"):
        MultimodalDataConfig.from_model_config(get_preset("tiny"), sources=[source], tokenizer=TOKENIZER)


def test_other_validation(source):
    with pytest.raises(DataConfigError, match="kind='text'"):
        _cfg(source, sources=(SourceConfig(path=source, kind="ids"),))
    with pytest.raises(DataConfigError, match="max_patches_per_row"):
        _cfg(source, max_patches_per_row=0)
    with pytest.raises(DataConfigError, match="min_pixels"):
        _cfg(source, min_pixels=100, max_pixels=99)


def test_fingerprint_covers_the_ids_and_keeps_the_flat_layout(source):
    a = _cfg(source)
    assert a.fingerprint() != _cfg(source, special=dict(TOKENS, video_token_id=600)).fingerprint()
    assert a.fingerprint() == a.replace(read_threads=2, docs_per_read=3).fingerprint()  # loader knobs: no
    # the hash as written when the six ids were fields of the config itself (independent of _stream_fields)
    flat = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)
            if f.name not in ("special", "worker_count", "worker_buffer_size", "read_threads", "docs_per_read")}
    flat.update(TOKENS)
    flat["sources"] = [dict(dataclasses.asdict(s), path="f.jsonl", size=3) for s in a.sources]
    with open(TOKENIZER, "rb") as f:
        flat["tokenizer"] = hashlib.sha256(f.read()).hexdigest()[:16]
    assert a.fingerprint() == hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
