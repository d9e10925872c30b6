"""Samples a trained model through the KV-cache engine, streaming the decoded text to stdout.

    python -m experiments.generate --workdir=runs/tiny --prompt='12+34=' --prompt='reverse abc ='
    python -m experiments.generate --workdir=DIR --config=experiments/configs/NAME.py --weights=ema --prompt=...
    python -m experiments.generate --hf_dir=DIR --prompt_ids=1,2,3 [--tokenizer=tokenizer.model --prompt=...]
    python -m experiments.generate --quantized=runs/tiny/quantized/w4a8 --prompt='12+34='
        [--max_new_tokens=64 --temperature=0.8 --top_k=50 --top_p=0.9 --seed=0 --speculative=mtp]
        [--kv_bits=8 --kv_hadamard]

The weights come from exactly one of `--workdir` (an `experiments.train` run: the newest loadable Orbax
checkpoint, raw or `--weights=ema`; `--config` is the run's config file with the overrides that change the
model or the train state, as for `experiments.export_hf`; text goes through its data config's sentencepiece
model, bos first when the run's data adds one), `--hf_dir` (`ernie_jax.from_pretrained`; text needs
`--tokenizer`, and gets its bos) or `--quantized` (an `experiments.quantize` output, loaded quantized; text
through the tokenizer of the run it came from). `--prompt_ids` are used as given. Prompt i samples with seed
`--seed + i`, as in `ernie_jax.generate`, whose output this equals token for token.

All prompts decode together, one cache slot each. Each prompt is printed with its continuation streaming
behind it as chunks are decoded, in prompt order (a later prompt's text, decoded meanwhile, appears when the
earlier ones end). A short run of the same shapes compiles everything first, so the closing tokens/s is
decoding speed; with `--speculative=mtp` (MTP drafts, verified) it also gives the draft acceptance rate and
the tokens per main-model forward. `--kv_bits=8|4` stores the KV cache as int8 / int4 codes with per-token
scales, `--kv_hadamard` after a randomised Hadamard rotation (`ernie_jax.quantization.kv_cache`).
"""

from __future__ import annotations

import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "with --workdir: the run's "
                                          "experiment config file", lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "an experiments.train run's directory (or --hf_dir)")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "a transformers ERNIE-4.5 directory (instead of --workdir)")
_QUANTIZED = flags.DEFINE_string("quantized", None, "an experiments.quantize output directory (instead of "
                                 "--workdir)")
_WEIGHTS = flags.DEFINE_enum("weights", "raw", ["raw", "ema"], "with --workdir: the raw parameters or their EMA")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "a sentencepiece .model for the text (default with "
                                 "--workdir or --quantized: the run's data tokenizer; with --hf_dir: none)")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "a text prompt (repeat the flag for several)")
_PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", None, "a prompt as comma-separated token ids (repeatable)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "at most this many new tokens per prompt (eos stops)")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature; 0 is greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens; 0: all")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample among the most likely tokens up to this probability mass")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed of the first prompt (prompt i: seed + i)")
_SPECULATIVE = flags.DEFINE_enum("speculative", None, ["mtp"], "draft with the model's MTP block, verify")
_KV_BITS = flags.DEFINE_enum("kv_bits", None, ["8", "4"], "store the KV cache as int8 / int4 codes + scales")
_KV_HADAMARD = flags.DEFINE_boolean("kv_hadamard", False, "rotate K / V (and Q) by a randomised Hadamard "
                                    "transform before the cache stores them")

_CHUNK = 8  # decode steps per engine chunk (ernie_jax.generate's default)


def _check_flags():
    """Usage errors that need no weights -> (each prompt's SamplingParams, the parsed --prompt_ids)."""
    if sum(map(bool, (_WORKDIR.value, _HF_DIR.value, _QUANTIZED.value))) != 1:
        raise app.UsageError(f"give exactly one of --workdir (a training run), --hf_dir (a transformers "
                             f"directory) or --quantized (an experiments.quantize output); got --workdir="
                             f"{_WORKDIR.value!r} --hf_dir={_HF_DIR.value!r} --quantized={_QUANTIZED.value!r}")
    if _QUANTIZED.value:
        for name in ("config", "weights"):
            if flags.FLAGS[name].present:
                raise app.UsageError(f"--{name} describes a training run: use it with --workdir, not --quantized")
    if _HF_DIR.value:
        if not os.path.isfile(os.path.join(_HF_DIR.value, "config.json")):
            raise app.UsageError(f"--hf_dir={_HF_DIR.value!r}: no config.json there (not a transformers directory)")
        for name in ("config", "weights"):
            if flags.FLAGS[name].present:
                raise app.UsageError(f"--{name} describes a training run: use it with --workdir, not --hf_dir")
    if bool(_PROMPT.value) == bool(_PROMPT_IDS.value):
        raise app.UsageError("give the prompts as --prompt (text) or --prompt_ids (comma-separated ids), one of "
                             f"the two; got --prompt={_PROMPT.value!r} --prompt_ids={_PROMPT_IDS.value!r}")
    if _PROMPT.value and _HF_DIR.value and not _TOKENIZER.value:
        raise app.UsageError("--prompt with --hf_dir needs --tokenizer=path/to/tokenizer.model (a sentencepiece "
                             "model); or give token ids with --prompt_ids")
    if _TOKENIZER.value and not os.path.isfile(_TOKENIZER.value):
        raise app.UsageError(f"--tokenizer={_TOKENIZER.value!r}: no such file")
    if _MAX_NEW.value < 1:
        raise app.UsageError(f"--max_new_tokens must be >= 1, got {_MAX_NEW.value}")
    ids = []
    for s in _PROMPT_IDS.value or ():
        try:
            ids.append([int(t) for t in s.split(",")])
        except ValueError:
            raise app.UsageError(f"--prompt_ids={s!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if any(t < 0 for p in ids for t in p):
        raise app.UsageError(f"--prompt_ids: token ids must be >= 0, got {ids}")
    from ernie_jax.inference import SamplingParams
    n = len(_PROMPT.value or ids)
    if not 0 <= _SEED.value <= 2**32 - n:
        raise app.UsageError(f"--seed must be in [0, 2**32 - {n}] ({n} prompts use seed + i), got {_SEED.value}")
    try:
        sampling = [SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value + i) for i in range(n)]
    except ValueError as e:  # the message starts with the parameter's name, which is the flag's
        raise app.UsageError(f"--{e}") from None
    return sampling, ids


def load_run(config, workdir: str, *, ema: bool):
    """(model, mesh, rules, data config, step) of the newest loadable checkpoint of a training run."""
    from ernie_jax.experiment import load_run as restore
    from ernie_jax.sharding import make_mesh, resolve_rules

    exp, model, step = restore(config, workdir, ema=ema)
    return model, make_mesh(exp.train.mesh), resolve_rules(exp.train.mesh), exp.data.train, step


class _Printer:
    """Prints every request's continuation behind its prompt, in request order, as its tokens arrive: text
    when there is a tokenizer (eos left out; an incomplete UTF-8 character waits for its next piece), ids
    otherwise."""

    def __init__(self, tok, prompts: list[list[int]], eos: int | None):
        self.tok, self.prompts, self.eos = tok, prompts, eos
        self.tokens = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.printed = [""] * len(prompts)
        self.current = -1
        self._next()

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t < self.tok.vocab_size])

    def _render(self, i: int) -> str:
        new = self.tokens[i]
        if self.tok is None:
            return "".join(f" {t}" for t in new)
        if self.done[i] and new and new[-1] == self.eos:
            new = new[:-1]
        before, after = self._text(self.prompts[i]), self._text(self.prompts[i] + new)
        text = after[len(before):] if after.startswith(before) else self._text(new)
        return text if self.done[i] else text.rstrip("\ufffd")

    def _next(self) -> None:
        self.current += 1
        if self.current < len(self.prompts):
            p = self.prompts[self.current]
            head = self._text(p) if self.tok is not None else f"{p} ->"
            print(f"[{self.current}] {head}", end="", flush=True)

    def add(self, i: int, tokens: list[int], done: bool) -> None:
        self.tokens[i] += tokens
        self.done[i] = self.done[i] or done
        while self.current < len(self.prompts):
            c = self.current
            text = self._render(c)
            if len(text) > len(self.printed[c]):
                print(text[len(self.printed[c]):], end="", flush=True)
                self.printed[c] = text
            if not self.done[c]:
                return
            print(flush=True)
            self._next()


def main(argv):
    from ernie_jax.experiment import start_cli
    start_cli(argv)
    sampling, prompt_ids = _check_flags()

    import ernie_jax
    from ernie_jax.data.tokenizer import SentencePieceTokenizer
    from ernie_jax.inference import Engine, KVCacheConfig
    from ernie_jax.inference.cache import bytes_per_token

    mesh = rules = None
    if _WORKDIR.value:
        model, mesh, rules, data_cfg, step = load_run(_CONFIG.value, _WORKDIR.value, ema=_WEIGHTS.value == "ema")
        tok_path, add_bos = _TOKENIZER.value or data_cfg.tokenizer, data_cfg.add_bos
        print(f"step {step} of {_WORKDIR.value} ({_WEIGHTS.value} weights)")
    elif _QUANTIZED.value:
        from ernie_jax.quantization.checkpoint import QuantizedCheckpointError, load_quantized, read_manifest
        try:
            manifest = read_manifest(_QUANTIZED.value)
            model = load_quantized(_QUANTIZED.value)
        except QuantizedCheckpointError as e:
            raise app.UsageError(f"--quantized: {e}") from None
        src = manifest["extra"]
        tok_path, add_bos = _TOKENIZER.value or src.get("tokenizer"), src.get("add_bos", True)
        print(f"{manifest['scheme']['name']} ({manifest['scheme']['method']}) weights of {src.get('source', '?')}")
    else:
        model = ernie_jax.from_pretrained(_HF_DIR.value)
        tok_path, add_bos = _TOKENIZER.value, True
    cfg = model.config
    if _PROMPT.value and not tok_path:
        raise app.UsageError("--prompt: this run's data config has no tokenizer; give --tokenizer=path.model or "
                             "--prompt_ids")
    tok = SentencePieceTokenizer(tok_path) if tok_path else None
    if tok is not None and _PROMPT.value:
        bos = [tok.bos_id] if add_bos and tok.bos_id >= 0 else []
        prompts = [bos + tok.encode(p).tolist() for p in _PROMPT.value]
    else:
        prompts = prompt_ids
    # the run's tokenizer's eos, as the trainer's evaluation uses; a transformers directory's config's
    eos = tok.eos_id if not _HF_DIR.value and tok is not None and tok.eos_id >= 0 else cfg.eos_token_id
    # cache length and slots as ernie_jax.generate picks them, so that the tokens are its own
    max_len = min(cfg.max_position_embeddings, -(-(max(map(len, prompts)) + _MAX_NEW.value) // 64) * 64)
    kv_cache = KVCacheConfig(bits=None if _KV_BITS.value is None else int(_KV_BITS.value), hadamard=_KV_HADAMARD.value)

    def engine(max_new: int, eos_id: int | None) -> tuple[Engine, list[int]]:
        try:
            e = Engine(model, max_slots=len(prompts), max_len=max_len, speculative=_SPECULATIVE.value,
                       chunk=_CHUNK, mesh=mesh, rules=rules, kv_cache=kv_cache)
            ids = []
            for i, (p, s) in enumerate(zip(prompts, sampling)):
                try:
                    ids.append(e.submit(p, max_new_tokens=max_new, sampling=s, eos_token_id=eos_id))
                except ValueError as err:
                    raise ValueError(f"--{'prompt' if _PROMPT.value else 'prompt_ids'} #{i}: {err}") from None
        except ValueError as err:  # a prompt or flag this model cannot take (vocabulary, length, MTP, KV scheme)
            raise app.UsageError(str(err)) from None
        return e, ids

    warm, _ = engine(min(2, _MAX_NEW.value), None)  # compiles prefill and a decode chunk of these shapes
    warm.run()
    e, ids = engine(_MAX_NEW.value, eos)
    printer = _Printer(tok, prompts, eos)
    t0 = time.perf_counter()
    for rid, new, done in e.stream():
        printer.add(ids.index(rid), new, done)
    dt = time.perf_counter() - t0
    s = e.summary()
    n = s["generated_tokens"]
    print(f"{len(prompts)} prompt(s), {n} new tokens in {dt:.3f} s: {n / dt:.1f} tokens/s")
    kv = e.kv_cache  # the scheme the engine decoded with
    if kv.bits or kv.hadamard:
        print(f"KV cache: {f'int{kv.bits}' if kv.bits else cfg.dtype}"
              f"{' after a Hadamard rotation' if kv.hadamard else ''}, "
              f"{bytes_per_token(cfg, mtp_depths=int(bool(_SPECULATIVE.value)), kv_bits=kv.bits)} bytes "
              f"per token")
    if _SPECULATIVE.value:
        print(f"speculative decoding (MTP drafts): acceptance rate {s['acceptance_rate']:.2f}, "
              f"{s['tokens_per_forward']:.2f} tokens per forward")


if __name__ == "__main__":
    logging.getLogger("ernie_jax").setLevel(logging.INFO)
    app.run(main)
