"""Preference data for DPO: each pair packed as one shared-question unit [prompt | chosen | rejected].

A record (`kind="preference"` sources) holds two whole conversations, `{"chosen": [...], "rejected": [...]}`,
that differ only in their last (assistant) turn - TRL's implicit-prompt format; prompts that differ are a
`DataError` naming the file, record and turn. The prompt is stored once and both responses follow it in one
row (FlashMask's shared-question mask): the responses see the prompt and not each other, the rejected
response's positions continue from the prompt's end as if the chosen one were not there, and the logits of
the prompt's last token score the first token of both. Packing, Grain read stage and exact resume are the
pre-training pipeline's (`PackedIterator`); a pair is never cut (one longer than `seq_len` is a `DataError`).

Rows (`make_preference_pipeline`), [R, seq_len] int32 unless said:
  tokens, positions, segment_ids (one segment per pair: 1, 2, ...; 0 padding);
  kv_visible_until  the first row that may no longer see this key: the end of the chosen response for its
                    keys (so the rejected rows do not see it), `seq_len` elsewhere;
  targets, side     the token each position predicts and whose log-probability it counts in: 1 chosen,
                    2 rejected, 0 none (prompt tokens and each response's last token);
  alt_targets, alt  the rejected response's first token, scored from the prompt's last position (alt = 1);
  loss_mask         1 where a response token is scored (side != 0 or alt), for token counts;
  sample_ids        [R, max_docs_per_row] int64, the pair's global sample index per segment, -1 padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ernie_jax.data import stream
from ernie_jax.data.config import DataConfig, DataConfigError, as_data_config
from ernie_jax.data.iterator import WholeDocumentIterator
from ernie_jax.data.packing import PackedBatch
from ernie_jax.data.sources import DataError, decode_record
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.posttrain.chat import ChatFormatError, check_pair, prompt, render

KEYS = ("tokens", "positions", "segment_ids", "kv_visible_until", "targets", "side", "alt_targets", "alt",
        "loss_mask")
EXTRA_KEYS = ("kv_visible_until", "side", "alt_targets", "alt")  # beyond the train step's BATCH_KEYS


def split_pair(record: dict, index: int) -> tuple[list, str, str]:
    """(prompt messages, chosen reply, rejected reply) of a record whose two conversations share every turn
    but the last (`chat.check_pair`: a `ChatFormatError` naming the record otherwise)."""
    check_pair(record, index=index)
    return record["chosen"][:-1], record["chosen"][-1]["content"], record["rejected"][-1]["content"]


def encode_pair(prompt_messages: list, chosen: str, rejected: str, tokenizer) -> np.ndarray:
    """[3 + p + c + r] int32: the lengths p, c, r, then the prompt's ids (with the generation prompt) and each
    reply's ids (its content and the closing end of sentence), cut from the whole conversation's rendering."""
    p = prompt(prompt_messages, tokenizer)
    parts = []
    for reply in (chosen, rejected):
        ids = np.asarray(render(prompt_messages + [{"role": "assistant", "content": reply}], tokenizer).ids,
                         np.int32)
        if not np.array_equal(ids[:len(p)], p):
            raise ChatFormatError("the conversation's rendering does not start with its prompt's")
        parts.append(ids[len(p):])
    return np.concatenate([[len(p), len(parts[0]), len(parts[1])], p, *parts]).astype(np.int32)


class PreferenceLoader(stream.Loader[np.ndarray]):
    """Global sample index → an encoded pair (`encode_pair`), validated."""

    def _prepare(self) -> None:
        other = [s.path for s in self.cfg.sources if s.kind != "preference"]
        if other:
            raise DataConfigError(f"the preference pipeline takes kind='preference' sources only; {other} are not")
        self.tokenizer = SentencePieceTokenizer(self.cfg.tokenizer)
        self.vocab_size = self.cfg.vocab_size or self.tokenizer.vocab_size

    def document(self, g: int) -> np.ndarray:
        s, _, r = self.order(g)
        scfg = self.cfg.sources[s]
        rec = decode_record(self.sources[s][r], scfg, r)
        try:
            doc = encode_pair(*split_pair(rec, r), self.tokenizer)
        except ChatFormatError as e:
            raise DataError(scfg.path, r, str(e), "preference") from None
        if int(doc[:3].sum()) > self.cfg.seq_len:
            raise DataError(scfg.path, r, f"pair of {int(doc[:3].sum())} tokens (prompt + both replies) does not "
                            f"fit seq_len={self.cfg.seq_len} (pairs are never cut)", "too_long")
        if int(doc[3:].max()) >= self.vocab_size:
            raise DataError(scfg.path, r, f"token id {int(doc[3:].max())} is outside [0, vocab_size="
                            f"{self.vocab_size})", "vocab")
        return doc


class PreferenceReadBlock(stream.ReadBlock[np.ndarray]):
    def layout(self, docs: list[np.ndarray | None]) -> stream.Block:
        real = [d for d in docs if d is not None]
        return {"lengths": np.asarray([-1 if d is None else len(d) for d in docs], np.int64),
                "pairs": np.concatenate(real) if real else np.zeros(0, np.int32)}

    @staticmethod
    def offsets(block: stream.Block) -> dict[str, np.ndarray]:
        return {"pairs": np.concatenate([[0], np.cumsum(np.maximum(block["lengths"], 0))])}

    @staticmethod
    def document(g: int, block: stream.Block, i: int, parts: dict[str, np.ndarray]) -> np.ndarray:
        return parts["pairs"]


def place_pair(out: dict[str, np.ndarray], r: int, o: int, seg: int, doc: np.ndarray, seq_len: int) -> int:
    """Writes pair `doc` (`encode_pair`) into row r of the arrays `out` from position o as segment `seg`;
    returns the next free position."""
    p, c, n = int(doc[0]), int(doc[1]), int(doc[2])
    ids = doc[3:]
    prompt, chosen, rejected = ids[:p], ids[p:p + c], ids[p + c:]
    sl = slice(o, o + p + c + n)
    out["tokens"][r, sl] = ids
    out["segment_ids"][r, sl] = seg
    out["positions"][r, sl] = np.concatenate([np.arange(p + c), p + np.arange(n)])
    out["kv_visible_until"][r, sl] = seq_len
    out["kv_visible_until"][r, o + p:o + p + c] = o + p + c
    # prompt row t predicts prompt t + 1; the last prompt row predicts both first reply tokens
    out["targets"][r, o:o + p - 1] = prompt[1:]
    out["targets"][r, o + p - 1] = chosen[0]
    out["side"][r, o + p - 1] = 1
    out["alt_targets"][r, o + p - 1] = rejected[0]
    out["alt"][r, o + p - 1] = 1
    for side, start, reply in ((1, o + p, chosen), (2, o + p + c, rejected)):
        out["targets"][r, start:start + len(reply) - 1] = reply[1:]
        out["side"][r, start:start + len(reply) - 1] = side
    out["loss_mask"][r, sl] = (out["side"][r, sl] != 0) | (out["alt"][r, sl] != 0)
    return o + p + c + n


class PreferencePipelineIterator(WholeDocumentIterator):
    """Per-process iterator over packed global batches of preference pairs (see the module doc)."""

    loader_type = PreferenceLoader
    read_block = PreferenceReadBlock
    kind = "preference"

    def _positions(self, doc) -> int:
        return int(doc[:3].sum())

    def _materialize(self, batch: PackedBatch) -> dict[str, np.ndarray]:
        cfg = self.cfg
        rows = batch.rows[self._rows]
        out = {k: np.zeros((len(rows), cfg.seq_len), np.int32) for k in KEYS}
        out["tokens"][:] = out["targets"][:] = out["alt_targets"][:] = cfg.pad_id
        out["sample_ids"] = np.full((len(rows), cfg.max_docs_per_row), -1, np.int64)
        for r, docs in enumerate(rows):
            o = 0
            for j, (g, d) in enumerate(docs):
                o = place_pair(out, r, o, j + 1, d, cfg.seq_len)
                out["sample_ids"][r, j] = g
        return out


def make_preference_pipeline(data_config: Any, *, process_index: int = 0, process_count: int = 1
                             ) -> PreferencePipelineIterator:
    """The per-process iterator over packed DPO batches of the `kind="preference"` sources of `data_config`."""
    cfg: DataConfig = as_data_config(data_config)
    return PreferencePipelineIterator(cfg, process_index, process_count)
