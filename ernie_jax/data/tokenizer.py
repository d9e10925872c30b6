"""SentencePiece tokenizer: load ERNIE's `tokenizer.model` (or the embedded default's) from a path.

The processor is loaded lazily and dropped on pickling, so a tokenizer can be shipped to Grain workers.
`train_sentencepiece` trains a model deterministically (one thread, no sentence sampling).
"""

from __future__ import annotations

import os

import numpy as np


class SentencePieceTokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path}: no such file")
        self.path = path
        self._sp = None
        sp = self.sp  # load now so a bad model fails here, not in a worker
        self.vocab_size = int(sp.get_piece_size())
        self.bos_id, self.eos_id = int(sp.bos_id()), int(sp.eos_id())
        self.pad_id, self.unk_id = int(sp.pad_id()), int(sp.unk_id())

    @property
    def sp(self):
        if self._sp is None:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor()
            try:
                ok = sp.Load(self.path)
            except Exception as e:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError
                raise ValueError(f"tokenizer model {self.path}: cannot load: {e}") from e
            if not ok:
                raise ValueError(f"tokenizer model {self.path}: cannot load")
            self._sp = sp
        return self._sp

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.EncodeAsIds(text), np.int32)

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_sp"] = None
        return d


def train_sentencepiece(input_path: str, model_prefix: str, vocab_size: int, *,
                        user_defined_symbols: tuple[str, ...] = ()) -> str:
    """Trains a BPE model on the lines of `input_path` deterministically; returns `<model_prefix>.model`.

    Ids: pad 0, bos 1 (`<s>`), eos 2 (`</s>`), unk 3, like ERNIE's tokenizer; digits are split one per
    piece so arithmetic is learnable; no normalisation (the model stays ~10 KB).
    """
    import sentencepiece as spm
    spm.SentencePieceTrainer.Train(
        input=input_path, model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        split_digits=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=False,
        user_defined_symbols=list(user_defined_symbols), minloglevel=2,
        normalization_rule_name="identity")
    return model_prefix + ".model"
