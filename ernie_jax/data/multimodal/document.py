"""One multimodal record -> one document: token ids with expanded image spans, its patches and grids.

A record is a JSON object `{"segments": [{"text": str} | {"image": base64 str}, ...], "answer": str}`
(`answer` optional). The document is `[bos] + segments + answer + [eos]` (bos / eos per the config): text is
tokenized segment by segment, each image is decoded with PIL and goes through
`ernie_jax.processor.preprocess_image` and `encode_prompt` (image_start + image_token x gh*gw/merge^2 +
image_end). A document is never split across rows (an image cannot be cut), so one that exceeds a row's
budgets (seq_len positions, max_patches_per_row, max_images_per_row) is a bad record. Every failure raises
`DataError` naming the file and the record, with a `kind` for the skip counters: corrupt, utf8, image,
vocab, empty, too_long.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any, NamedTuple

import numpy as np

from ernie_jax.data.multimodal.config import MultimodalDataConfig
from ernie_jax.data.sources import DataError
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.processor import EncodedPrompt, Vision, encode_prompt

_ERNIE_BOS, _ERNIE_EOS = 1, 2


class MMDocument(NamedTuple):
    """A packed unit: n tokens give n - 1 (input, target) positions."""
    g: int                 # global sample index
    tokens: np.ndarray     # int32 [n]
    answer_start: int      # index in `tokens` of the first answer token (n: the record has no answer)
    patches: np.ndarray    # fp32 [p, 3*patch*patch], the images' patches in order of appearance
    grids: np.ndarray      # int32 [k, 3] (1, gh, gw) per image

    @property
    def length(self) -> int:
        return len(self.tokens) - 1


class DocumentEncoder:
    """Records -> documents (picklable: the tokenizer reloads lazily in Grain workers)."""

    def __init__(self, cfg: MultimodalDataConfig):
        self.cfg = cfg
        self.tokenizer = SentencePieceTokenizer(cfg.tokenizer)
        self.vocab_size = cfg.vocab_size or self.tokenizer.vocab_size
        self.bos = self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else _ERNIE_BOS
        self.eos = self.tokenizer.eos_id if self.tokenizer.eos_id >= 0 else _ERNIE_EOS
        self.special = cfg.special

    # -- parsing ----------------------------------------------------------------------------------------
    def parse(self, raw: bytes, path: str, record: int) -> tuple[list[tuple[str, Any]], str | None]:
        """Raw record bytes -> ([("text", str) | ("image", bytes)], answer or None)."""
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(path, record, f"invalid UTF-8: {e}", "utf8") from e
        except json.JSONDecodeError as e:
            raise DataError(path, record, f"corrupt or truncated JSON: {e}", "corrupt") from e
        return self.parse_object(obj, path, record)

    def parse_object(self, obj: Any, path: str, record: int) -> tuple[list[tuple[str, Any]], str | None]:
        """A decoded record -> ([("text", str) | ("image", bytes)], answer or None)."""
        if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
            raise DataError(path, record, "expected a JSON object with a list 'segments'", "corrupt")
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise DataError(path, record, "field 'answer' is not a string", "corrupt")
        segs: list[tuple[str, Any]] = []
        for i, seg in enumerate(obj["segments"]):
            if not isinstance(seg, dict) or len(seg) != 1 or not isinstance(next(iter(seg.values())), str):
                raise DataError(path, record, f"segment {i}: expected {{'text': str}} or {{'image': base64 str}}, "
                                f"got {str(seg)[:80]}", "corrupt")
            (key, val), = seg.items()
            if key == "text":
                segs.append(("text", val))
            elif key == "image":
                try:
                    segs.append(("image", base64.b64decode(val, validate=True)))
                except (binascii.Error, ValueError) as e:
                    raise DataError(path, record, f"segment {i}: image is not valid base64: {e}", "image") from e
            else:
                raise DataError(path, record, f"segment {i}: unknown segment type {key!r} (expected 'text' or "
                                "'image')", "corrupt")
        return segs, answer

    def _text(self, text: str, path: str, record: int, where: str) -> np.ndarray:
        try:
            text.encode("utf-8")  # JSON \ud800 escapes decode to lone surrogates: invalid UTF-8
        except UnicodeEncodeError as e:
            raise DataError(path, record, f"{where}: invalid UTF-8 (lone surrogate): {e}", "utf8") from e
        ids = self.tokenizer.encode(text).astype(np.int64) if text else np.zeros(0, np.int64)
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(path, record, f"{where}: token id {int(ids[i])} at position {i} is outside "
                            f"[0, vocab_size={self.vocab_size})", "vocab")
        return ids

    def _image(self, data: bytes, path: str, record: int, where: str) -> Vision:
        from PIL import Image
        cfg = self.cfg
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return Vision.from_image(im, patch_size=cfg.patch_size, merge_size=cfg.spatial_merge_size,
                                         min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable bytes
            raise DataError(path, record, f"{where}: cannot decode or preprocess the image: {e}", "image") from e

    def prompt(self, segments: list[tuple[str, Any]], path: str, record: int) -> EncodedPrompt:
        """[bos] + segments, through the processor (what a model is prompted with at evaluation)."""
        pieces: list[Any] = [np.array([self.bos] if self.cfg.add_bos else [], np.int64)]
        for i, (kind, val) in enumerate(segments):
            where = f"segment {i}"
            pieces.append(self._text(val, path, record, where) if kind == "text"
                          else self._image(val, path, record, where))
        try:
            return encode_prompt(pieces, self.special, merge_size=self.cfg.spatial_merge_size)
        except ValueError as e:
            raise DataError(path, record, str(e), "vocab") from e

    # -- documents --------------------------------------------------------------------------------------
    def document(self, g: int, raw: bytes, path: str, record: int) -> MMDocument:
        """Raw record -> the training document; DataError (naming file and record) for bad input."""
        cfg = self.cfg
        segments, answer = self.parse(raw, path, record)
        enc = self.prompt(segments, path, record)
        answer_ids = self._text(answer, path, record, "answer") if answer else np.zeros(0, np.int64)
        eos = np.array([self.eos] if cfg.add_eos else [], np.int64)
        tokens = np.concatenate([enc.input_ids, answer_ids, eos]).astype(np.int32)
        answer_start = len(enc.input_ids) if answer_ids.size else len(tokens)
        if len(tokens) < 2:
            raise DataError(path, record, "document has fewer than 2 tokens (nothing to predict)", "empty")
        width = 3 * cfg.patch_size ** 2
        patches = (np.concatenate([v.patches for v in enc.images]) if enc.images
                   else np.zeros((0, width), np.float32)).astype(np.float32, copy=False)
        grids = np.array([v.grid_thw for v in enc.images], np.int32).reshape(-1, 3)
        need = (len(tokens) - 1, len(patches), len(grids))
        have = (cfg.seq_len, cfg.max_patches_per_row, cfg.max_images_per_row)
        if any(n > h for n, h in zip(need, have)):
            raise DataError(path, record, f"document needs {need[0]} positions, {need[1]} patches and {need[2]} "
                            f"images; a row holds seq_len={have[0]}, max_patches_per_row={have[1]}, "
                            f"max_images_per_row={have[2]} (a document is never split across rows)", "too_long")
        return MMDocument(g, tokens, answer_start, patches, grids)
