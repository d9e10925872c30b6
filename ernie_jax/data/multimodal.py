"""`make_multimodal_pipeline`: the text pipeline's guarantees for interleaved text + image records.

Same three stages as `pipeline.py`:
1. **Read** (Grain `MapDataset`, optionally `mp_prefetch`ed over workers): block k holds the documents with
   global indices [start + k*D, start + (k+1)*D); each is `GlobalOrder(g)` -> (source, epoch, record) ->
   raw JSON -> `DocumentEncoder.document` (tokenize, decode + preprocess images, check the row budgets). The
   stage is one-to-one and stateless, so any worker count returns the same blocks.
2. **Pack** (consuming process): `pack_mm_global_batch`, first fit under seq_len, max_patches_per_row,
   max_images_per_row and max_docs_per_row together; documents are never split.
3. **Slice**: process p of P takes rows [p*R/P, (p+1)*R/P) of the R = `global_batch_size` rows.

State (JSON, identical on every process, valid for any process count): the config fingerprint, the next
global batch and sample index, the carried documents' global indices (re-read on restore) and the skip
counters. Batch layout: see `mm_packing.py`. No 3D position ids: the model derives them from
`mm_token_type_ids`, `image_grid_thw` and `segment_ids`; `positions` (1D, restarting per document) is kept
for code shared with the text pipeline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ernie_jax.data.config import DataConfigError
from ernie_jax.data.mm_config import MultimodalDataConfig
from ernie_jax.data.mm_document import DocumentEncoder, MMDocument
from ernie_jax.data.mm_packing import materialize_mm, pack_mm_global_batch
from ernie_jax.data.order import GlobalOrder
from ernie_jax.data.pipeline import _ENDLESS_BLOCKS, _dataset_iterator_base, _ensure_absl_flags_parsed
from ernie_jax.data.sources import DataError, open_source
from ernie_jax.processor import EncodedPrompt

STATE_VERSION = 1
MM_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "sample_ids", "mm_token_type_ids",
           "moe_mm_token_type_ids", "pixel_values", "image_grid_thw")


class MMDocLoader:
    """Global sample index -> `MMDocument` (picklable; sources reopen lazily in workers)."""

    def __init__(self, cfg: MultimodalDataConfig):
        self.cfg = cfg
        self.sources = [open_source(s) for s in cfg.sources]
        self.encoder = DocumentEncoder(cfg)
        self.order = GlobalOrder(cfg.seed, [len(s) for s in self.sources], [s.weight for s in cfg.sources],
                                 block=cfg.mix_block, num_epochs=cfg.num_epochs)

    def where(self, g: int) -> tuple[str, int, int]:
        """g -> (source path, epoch, record index)."""
        s, e, r = self.order(g)
        return self.cfg.sources[s].path, e, r

    def document(self, g: int) -> MMDocument:
        s, _, r = self.order(g)
        return self.encoder.document(g, self.sources[s][r], self.cfg.sources[s].path, r)

    def load(self, g: int) -> tuple[MMDocument | None, str | None]:
        """(document, None), or in skip mode (None, kind of error)."""
        try:
            return self.document(g), None
        except DataError as e:
            if self.cfg.on_bad_record == "skip":
                return None, e.kind
            raise


class MMReadBlock:
    """Stage-1 element k: the documents [start + k*D, min(start + (k+1)*D, end)) as flat arrays."""

    def __init__(self, loader: MMDocLoader, start: int, per: int, end: int | None):
        self.loader, self.start, self.per, self.end = loader, start, per, end

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        g0 = self.start + int(k) * self.per
        g1 = g0 + self.per if self.end is None else min(g0 + self.per, self.end)
        docs, kinds = [], []
        for g in range(g0, g1):
            d, kind = self.loader.load(g)
            docs.append(d)
            kinds.append(kind or "")
        real = [d for d in docs if d is not None]
        width = 3 * self.loader.cfg.patch_size ** 2
        return {
            "g0": np.int64(g0),
            "lengths": np.array([-1 if d is None else len(d.tokens) for d in docs], np.int64),
            "answer_start": np.array([0 if d is None else d.answer_start for d in docs], np.int64),
            "num_patches": np.array([0 if d is None else len(d.patches) for d in docs], np.int64),
            "num_images": np.array([0 if d is None else len(d.grids) for d in docs], np.int64),
            "kinds": np.asarray(kinds, dtype="U16"),
            "tokens": np.concatenate([d.tokens for d in real]) if real else np.zeros(0, np.int32),
            "patches": np.concatenate([d.patches for d in real]) if real else np.zeros((0, width), np.float32),
            "grids": np.concatenate([d.grids for d in real]) if real else np.zeros((0, 3), np.int32),
        }


def _doc_stream(loader: MMDocLoader, start: int, cfg: MultimodalDataConfig):
    """A Grain iterator of stage-1 blocks from global index `start`."""
    import grain
    end = loader.order.length
    per = cfg.docs_per_read
    nblocks = _ENDLESS_BLOCKS if end is None else max(0, -(-(end - start) // per))
    ds = grain.MapDataset.range(nblocks).map(MMReadBlock(loader, start, per, end))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=max(1, 2 * cfg.read_threads)))
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                           per_worker_buffer_size=cfg.worker_buffer_size))
    return iter(ids)


class MultimodalPipelineIterator(_dataset_iterator_base()):
    """Per-process iterator over packed multimodal global batches; a Grain `DatasetIterator` with a global
    JSON state (`get_state` / `set_state`), like `PipelineIterator`."""

    def __init__(self, cfg: MultimodalDataConfig, process_index: int = 0, process_count: int = 1):
        super().__init__()
        if not 0 <= process_index < process_count:
            raise DataConfigError(f"process_index {process_index} outside [0, process_count={process_count})")
        if cfg.global_batch_size % process_count:
            raise DataConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                                  f"process_count {process_count}")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.loader = MMDocLoader(cfg)
        self._fingerprint = cfg.fingerprint()
        per = cfg.global_batch_size // process_count
        self._rows = slice(process_index * per, (process_index + 1) * per)
        self._next_batch, self._next_g = 0, 0
        self._carry: list[MMDocument] = []
        self._skipped: dict[str, int] = {}
        self._stream = None
        self._block: dict | None = None
        self._block_pos = 0
        self._offsets: dict[str, np.ndarray] = {}
        self._ended = False

    # -- the document stream ------------------------------------------------------------------------
    def _open_stream(self):
        if self._stream is None:
            self._stream = _doc_stream(self.loader, self._next_g, self.cfg)
            self._block = None

    def _close_stream(self):
        if self._stream is not None:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        self._stream, self._block = None, None

    def _next_doc(self) -> tuple[int, MMDocument | None] | None:
        end = self.loader.order.length
        if end is not None and self._next_g >= end:
            return None
        self._open_stream()
        if self._block is None or self._block_pos >= len(self._block["lengths"]):
            b = self._block = next(self._stream)
            self._block_pos = 0
            assert int(b["g0"]) == self._next_g, (int(b["g0"]), self._next_g)
            self._offsets = {k: np.concatenate([[0], np.cumsum(v)]) for k, v in
                             (("tokens", np.maximum(b["lengths"], 0)), ("patches", b["num_patches"]),
                              ("grids", b["num_images"]))}
        b, i = self._block, self._block_pos
        self._block_pos += 1
        g = self._next_g
        self._next_g += 1
        if b["lengths"][i] < 0:
            kind = str(b["kinds"][i])
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return g, None
        part = {k: b[k][int(o[i]):int(o[i + 1])] for k, o in self._offsets.items()}
        return g, MMDocument(g, part["tokens"], int(b["answer_start"][i]), part["patches"], part["grids"])

    # -- iteration ------------------------------------------------------------------------------------
    def __next__(self) -> dict[str, np.ndarray]:
        if self._ended:
            raise StopIteration
        cfg = self.cfg
        batch, carry = pack_mm_global_batch(
            self._carry, self._next_doc, seq_len=cfg.seq_len, max_patches=cfg.max_patches_per_row,
            max_images=cfg.max_images_per_row, rows=cfg.global_batch_size, max_docs=cfg.max_docs_per_row,
            lookahead=cfg.pack_lookahead)
        if not any(batch.rows):
            self._ended = True
            self._close_stream()
            raise StopIteration
        self._carry = carry
        self._next_batch += 1
        return materialize_mm(batch, self._rows, seq_len=cfg.seq_len, max_docs=cfg.max_docs_per_row,
                              max_patches=cfg.max_patches_per_row, max_images=cfg.max_images_per_row,
                              patch_dim=3 * cfg.patch_size ** 2, pad_id=cfg.pad_id,
                              special=self.loader.encoder.special, answer_only=cfg.answer_only_loss)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "multimodal",
            "fingerprint": self._fingerprint,
            "seed": self.cfg.seed,
            "next_batch": self._next_batch,
            "next_sample": self._next_g,
            "carry": [int(d.g) for d in self._carry],
            "skipped": dict(sorted(self._skipped.items())),
            "ended": self._ended,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("kind") != "multimodal":
            raise ValueError(f"not a multimodal data pipeline state of version {STATE_VERSION}: {state!r:.200}")
        if state["fingerprint"] != self._fingerprint:
            raise ValueError(f"the saved data state belongs to another data config (fingerprint "
                             f"{state['fingerprint']}, this config {self._fingerprint}): resuming would change "
                             "the sample stream")
        self._close_stream()
        self._next_batch, self._next_g = int(state["next_batch"]), int(state["next_sample"])
        self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self._ended = bool(state["ended"])
        self._carry = [self.loader.document(int(g)) for g in state["carry"]]

    def metrics(self) -> dict[str, int]:
        """Counters for logging: skipped bad records (total and per kind), progress."""
        m = {"data/skipped_records": sum(self._skipped.values()),
             "data/global_batch": self._next_batch, "data/next_sample": self._next_g}
        m.update({f"data/skipped_{k}": v for k, v in self._skipped.items()})
        return m

    def start_prefetch(self) -> None:
        if not self._ended:
            self._open_stream()

    def close(self) -> None:
        self._close_stream()

    def __del__(self):
        try:
            self._close_stream()
        except Exception:  # noqa: BLE001
            pass

    def __str__(self) -> str:
        return (f"MultimodalPipelineIterator(process {self.process_index}/{self.process_count}, "
                f"batch {self._next_batch})")


def make_multimodal_pipeline(data_config: MultimodalDataConfig | dict[str, Any], *, process_index: int = 0,
                             process_count: int = 1) -> MultimodalPipelineIterator:
    """The per-process iterator over packed multimodal global batches (see the module doc; layout in
    `mm_packing.py`): per item, for R = global_batch_size / process_count rows, `tokens`, `targets`,
    `segment_ids`, `positions`, `loss_mask`, `mm_token_type_ids`, `moe_mm_token_type_ids` int32 [R, S],
    `sample_ids` int64 [R, max_docs_per_row], `pixel_values` fp32 [R, P, 3*patch^2], `image_grid_thw` int32
    [R, N, 3]."""
    if isinstance(data_config, dict):
        data_config = MultimodalDataConfig.from_dict(data_config)
    if not isinstance(data_config, MultimodalDataConfig):
        raise DataConfigError(f"data_config must be a MultimodalDataConfig or a dict, got {type(data_config).__name__}")
    return MultimodalPipelineIterator(data_config, process_index, process_count)


def vqa_data_config(model_config: Any, split: str = "train", **overrides) -> MultimodalDataConfig:
    """The `MultimodalDataConfig` of the embedded VQA corpus (generated on first use into data/vqa/) with the
    embedded 512-piece tokenizer, the special ids and patch / merge sizes of `model_config` (e.g. tiny-vl)."""
    from ernie_jax.data.config import SourceConfig
    from ernie_jax.data.synthetic import default_data_dir
    from ernie_jax.data.synthetic_vqa import ensure_vqa_data
    paths = ensure_vqa_data()
    kw: dict[str, Any] = dict(sources=(SourceConfig(path=str(paths[split]), name=f"vqa-{split}"),),
                              tokenizer=str(default_data_dir() / "tokenizer.model"), seq_len=256,
                              global_batch_size=16, max_docs_per_row=16, max_patches_per_row=512,
                              max_images_per_row=16, docs_per_read=16)
    kw.update(overrides)
    return MultimodalDataConfig.from_model_config(model_config, **kw)


def encode_example_prompt(example: dict, data_config: MultimodalDataConfig,
                          encoder: DocumentEncoder | None = None) -> EncodedPrompt:
    """A record's prompt (bos + segments, no answer, no eos) as the processor's `EncodedPrompt`: what a model is
    prompted with to answer it (int64 ids and type ids, images as `Vision`). Pass `encoder` to reuse one."""
    enc = encoder or DocumentEncoder(data_config)
    segments, _ = enc.parse_object({"segments": example["segments"]}, "<example>", 0)
    return enc.prompt(segments, "<example>", 0)
