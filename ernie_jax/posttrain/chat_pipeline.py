"""SFT data: chat conversations packed into rows, the loss on the assistant turns only.

The pre-training pipeline's stages and state (`ernie_jax.data.iterator.PackedIterator`: Grain read stage,
global packing, per-process slices, exact resume under any process count) over `kind="chat"` sources: each
record is a conversation rendered by ERNIE's chat template (`chat.render`) into ids and a loss mask. A
conversation is never cut: it is placed whole into the first row with room (first fit, as documents are), so
an assistant turn always sees its prompt; one longer than `seq_len + 1` tokens is a `DataError` naming file
and record (or skipped and counted with `on_bad_record="skip"`). The template brings its own begin / end of
sentence ids: `add_bos` / `add_eos` are not used.

Rows (`make_chat_pipeline`): `tokens`, `targets`, `segment_ids`, `positions`, `loss_mask` [R, seq_len]
int32 and `sample_ids` [R, max_docs_per_row] int64, as `make_pipeline`'s; `loss_mask[i]` is 1 where
`targets[i]` is an assistant token (its content or the end-of-sentence id closing the turn), so the train
step's token-balanced loss averages over the assistant tokens of the global batch.
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
from ernie_jax.posttrain.chat import ChatFormatError, render

Doc = np.ndarray  # [2, n] int32: ids, loss mask


class ChatLoader(stream.Loader[Doc]):
    """Global sample index → a rendered conversation [2, n] (ids; loss mask), validated."""

    def _prepare(self) -> None:
        other = [s.path for s in self.cfg.sources if s.kind != "chat"]
        if other:
            raise DataConfigError(f"the chat pipeline takes kind='chat' sources only; {other} are not")
        self.tokenizer = SentencePieceTokenizer(self.cfg.tokenizer)
        self.vocab_size = self.cfg.vocab_size or self.tokenizer.vocab_size

    def document(self, g: int) -> Doc:
        s, _, r = self.order(g)
        scfg = self.cfg.sources[s]
        messages = decode_record(self.sources[s][r], scfg, r)
        try:
            out = render(messages, self.tokenizer)
        except ChatFormatError as e:
            raise DataError(scfg.path, r, str(e), "chat") from None
        ids, mask = np.asarray(out.ids, np.int32), np.asarray(out.loss_mask, np.int32)
        if len(ids) - 1 > self.cfg.seq_len:
            raise DataError(scfg.path, r, f"conversation of {len(ids)} tokens does not fit seq_len="
                            f"{self.cfg.seq_len} + 1 (conversations are never cut)", "too_long")
        if int(ids.max()) >= self.vocab_size:
            raise DataError(scfg.path, r, f"token id {int(ids.max())} is outside [0, vocab_size={self.vocab_size})",
                            "vocab")
        return np.stack([ids, mask])


class ChatReadBlock(stream.ReadBlock[Doc]):
    """Stage-1 element: the conversations' lengths and their ids and masks, concatenated."""

    def layout(self, docs: list[Doc | None]) -> stream.Block:
        real = [d for d in docs if d is not None]
        flat = np.concatenate(real, axis=1) if real else np.zeros((2, 0), np.int32)
        return {"lengths": np.asarray([-1 if d is None else d.shape[1] for d in docs], np.int64),
                "ids": flat[0], "mask": flat[1]}

    @staticmethod
    def offsets(block: stream.Block) -> dict[str, np.ndarray]:
        o = np.concatenate([[0], np.cumsum(np.maximum(block["lengths"], 0))])
        return {"ids": o, "mask": o}

    @staticmethod
    def document(g: int, block: stream.Block, i: int, parts: dict[str, np.ndarray]) -> Doc:
        return np.stack([parts["ids"], parts["mask"]])


class ChatPipelineIterator(WholeDocumentIterator):
    """Per-process iterator over packed global batches of conversations (see the module doc)."""

    loader_type = ChatLoader
    read_block = ChatReadBlock
    kind = "chat"
    loader: ChatLoader

    def _positions(self, doc) -> int:
        return doc.shape[1] - 1

    def _materialize(self, batch: PackedBatch) -> dict[str, np.ndarray]:
        cfg = self.cfg
        rows = batch.rows[self._rows]
        n, s = len(rows), cfg.seq_len
        out = {k: np.zeros((n, s), np.int32) for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
        out["tokens"][:] = out["targets"][:] = cfg.pad_id
        out["sample_ids"] = np.full((n, cfg.max_docs_per_row), -1, np.int64)
        for r, docs in enumerate(rows):
            o = 0
            for j, (g, d) in enumerate(docs):
                m = d.shape[1] - 1
                out["tokens"][r, o:o + m] = d[0, :-1]
                out["targets"][r, o:o + m] = d[0, 1:]
                out["loss_mask"][r, o:o + m] = d[1, 1:]
                out["segment_ids"][r, o:o + m] = j + 1
                out["positions"][r, o:o + m] = np.arange(m)
                out["sample_ids"][r, j] = g
                o += m
        return out


def make_chat_pipeline(data_config: Any, *, process_index: int = 0, process_count: int = 1
                       ) -> ChatPipelineIterator:
    """The per-process iterator over packed SFT batches of the `kind="chat"` sources of `data_config` (a
    `DataConfig` or a dict); the embedded tasks' chat sets: `ernie_jax.synthetic.chat_tasks.chat_data_config`."""
    cfg: DataConfig = as_data_config(data_config)
    return ChatPipelineIterator(cfg, process_index, process_count)
