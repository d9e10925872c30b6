"""`Engine`: continuous batching over a fixed number of cache slots.

Requests wait in a queue; whenever slots are free, the waiting requests are prefilled into them (text prompts
together, right-padded to a power-of-two length; VL prompts one by one, images and all), then every busy slot
decodes a chunk of tokens in one compiled loop (`chunk` steps, or fewer when every slot has finished). A slot
is freed as soon as its request ends (eos, a stop sequence, `max_new_tokens`) and the next request joins at the
next chunk boundary while the others keep decoding. Each slot has its own cache index, RoPE delta, sampling
parameters and random key (its own seed and token count), so a request's tokens are the ones it gets alone.

The compiled functions are module-level `jax.jit`s keyed by the model's graph, the shapes and the mode: engines
of the same shapes reuse them (`generate` builds one engine per call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ernie_jax.inference import decode as fwd
from ernie_jax.inference.cache import KVCache, init_cache, insert
from ernie_jax.inference.sampling import SamplingParams, distribution, row_keys, sample, sample_from
from ernie_jax.inference.speculative import accept_draft
from ernie_jax.quantization.kv_cache import KVCacheConfig, resolve as resolve_kv_cache
from ernie_jax.sharding import activate

SPECULATIVE = (None, "mtp")


@struct.dataclass
class Slots:
    """Per-slot decoding state, every field [B]."""

    index: jax.Array  # int32 positions in the cache
    token: jax.Array  # int32 last generated token (emitted, not yet in the cache)
    delta: jax.Array  # int32 RoPE delta (VL)
    count: jax.Array  # int32 tokens generated so far
    max_new: jax.Array  # int32
    eos: jax.Array  # int32, -1: none
    active: jax.Array  # bool: holds a request that has not finished
    seed: jax.Array  # uint32
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    forwards: jax.Array  # int32 main-model decode forwards of the request
    accepted: jax.Array  # int32 accepted drafts (speculative)
    draft: jax.Array  # int32 the MTP draft for position index + 1 (speculative)
    draft_probs: jax.Array  # float32 [B, V] its distribution (speculative; [B, 1] otherwise)

    @classmethod
    def empty(cls, batch: int, vocab: int) -> "Slots":
        z = jnp.zeros((batch,), jnp.int32)
        return cls(index=z, token=z, delta=z, count=z, max_new=z, eos=z - 1, active=jnp.zeros((batch,), bool),
                   seed=z.astype(jnp.uint32), temperature=z.astype(jnp.float32), top_k=z,
                   top_p=jnp.ones((batch,), jnp.float32), forwards=z, accepted=z, draft=z,
                   draft_probs=jnp.zeros((batch, vocab), jnp.float32))

    def params(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.temperature, self.top_k, self.top_p


def _sub(keys: jax.Array, i: int) -> jax.Array:
    """A per-purpose key of each row's step key."""
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


@functools.partial(jax.jit, static_argnames=("config", "batch", "length", "spec", "vocab", "kv_cache"))
def _init(config, batch: int, length: int, spec: bool, vocab: int,
          kv_cache: KVCacheConfig | None = None) -> tuple[KVCache, Slots]:
    return (init_cache(config, batch, length, mtp_depths=int(spec), kv_cache=kv_cache),
            Slots.empty(batch, vocab if spec else 1))


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("cache", "slots"))
def _prefill(graphdef, state, cache: KVCache, slots: Slots, ids, lengths, rows, new: dict, mm: dict | None,
             *, spec: bool):
    """Prefills `ids` [m, P] (right-padded, `lengths` [m]) into the slots `rows` [m] (>= B: padding rows) with
    the requests' settings `new` ([m] arrays of the `Slots` fields); samples each one's first token."""
    model = nnx.merge(graphdef, state)
    out = fwd.prefill(model, ids, lengths, mm)
    keys = row_keys(new["seed"], jnp.zeros_like(lengths))
    params = (new["temperature"], new["top_k"], new["top_p"])
    first = sample(out["logits"], *params, _sub(keys, 0))
    mtp_k = mtp_v = ()
    rows_new = dict(new, index=lengths, token=first, delta=out["delta"], count=jnp.ones_like(lengths),
                    active=(first != new["eos"]) & (new["max_new"] > 1), forwards=jnp.zeros_like(lengths),
                    accepted=jnp.zeros_like(lengths))
    if spec:
        m = ids.shape[0]
        nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        nxt = nxt.at[jnp.arange(m), lengths - 1].set(first)  # position P-1's next token is the first new one
        logits, k, v = fwd.mtp_prefill(model, nxt, out["hidden"], out["angles"])
        q = distribution(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], *params)
        rows_new.update(draft=sample_from(q, _sub(keys, 3)), draft_probs=q)
        mtp_k, mtp_v = (k,), (v,)
    cache = insert(cache, out["k"], out["v"], mtp_k, mtp_v, rows)
    slots = slots.replace(**{f: getattr(slots, f).at[rows].set(val.astype(getattr(slots, f).dtype), mode="drop")
                             for f, val in rows_new.items()})
    return cache, slots, first


def _emit(slots: Slots, a: jax.Array, tok: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows `a` emit `tok`: -> (the emitted column (-1 elsewhere), new count, still active)."""
    count = slots.count + a
    return jnp.where(a, tok, -1), count, a & (tok != slots.eos) & (count < slots.max_new)


def _chunk_loop(step, cache: KVCache, slots: Slots, stop, chunk: int, width: int):
    """Up to `chunk` calls of `step(cache, slots) -> (cache, slots, tokens [B, width])` while any slot is active
    (rows `stop` deactivated first) -> (cache, slots, tokens [B, chunk, width], -1 = none)."""
    slots = slots.replace(active=slots.active & ~stop)
    out = jnp.full((slots.index.shape[0], chunk, width), -1, jnp.int32)

    def body(carry):
        i, cache, s, out = carry
        cache, s, cols = step(cache, s)
        return i + 1, cache, s, out.at[:, i].set(cols)

    _, cache, slots, out = jax.lax.while_loop(lambda c: (c[0] < chunk) & jnp.any(c[2].active), body,
                                              (0, cache, slots, out))
    return cache, slots, out


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("cache", "slots"))
def _decode_chunk(graphdef, state, cache: KVCache, slots: Slots, stop, layers, *, chunk: int):
    """Up to `chunk` plain decode steps of every active slot -> (cache, slots, tokens [B, chunk, 1])."""
    model = nnx.merge(graphdef, state)

    def step(cache, s):
        logits, _, cache = fwd.decode(model, s.token[:, None], s.index, s.delta, cache, layers)
        nxt = sample(logits[:, 0], *s.params(), _sub(row_keys(s.seed, s.count), 0))
        a = s.active
        col, count, active = _emit(s, a, nxt)
        s = s.replace(index=s.index + a, token=jnp.where(a, nxt, s.token), count=count, active=active,
                      forwards=s.forwards + a)
        return cache, s, col[:, None]

    return _chunk_loop(step, cache, slots, stop, chunk, 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("cache", "slots"))
def _speculative_chunk(graphdef, state, cache: KVCache, slots: Slots, stop, layers, *, chunk: int):
    """Up to `chunk` MTP speculative steps (`speculative` module doc) -> (cache, slots, tokens [B, chunk, 2])."""
    model = nnx.merge(graphdef, state)

    def step(cache, s):
        logits, hidden, cache = fwd.decode(model, jnp.stack([s.token, s.draft], 1), s.index, s.delta, cache,
                                           layers)
        keys = row_keys(s.seed, s.count)
        accepted, first = accept_draft(distribution(logits[:, 0], *s.params()), s.draft_probs, s.draft,
                                       _sub(keys, 0), _sub(keys, 1))
        bonus = sample(logits[:, 1], *s.params(), _sub(keys, 2))
        a = s.active
        col1, count, active1 = _emit(s, a, first)
        col2, count, active2 = _emit(s.replace(count=count), active1 & accepted, bonus)
        active = jnp.where(accepted, active2, active1)
        # the MTP depth settles positions n (next token `first`) and n + 1 (next token `bonus`, if accepted)
        mtp_logits, cache = fwd.mtp_decode(model, jnp.stack([first, bonus], 1), hidden, s.index, s.delta, cache)
        q = distribution(jnp.take_along_axis(mtp_logits, accepted.astype(jnp.int32)[:, None, None], axis=1)[:, 0],
                         *s.params())
        s = s.replace(index=s.index + jnp.where(a, 1 + accepted, 0), token=jnp.where(accepted, bonus, first),
                      count=count, active=active, forwards=s.forwards + a, accepted=s.accepted + (a & accepted),
                      draft=sample_from(q, _sub(keys, 3)), draft_probs=q)
        return cache, s, jnp.stack([col1, col2], 1)

    return _chunk_loop(step, cache, slots, stop, chunk, 2)


@dataclasses.dataclass
class Request:
    id: int
    prompt: Any  # list[int] or an EncodedPrompt
    max_new_tokens: int
    sampling: SamplingParams
    eos_token_id: int | None
    stop_sequences: tuple[tuple[int, ...], ...]
    output: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    forwards: int = 0
    accepted: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt) if _is_text(self.prompt) else len(self.prompt.input_ids)


def _is_text(prompt) -> bool:
    """Token ids, not an `EncodedPrompt` (a NamedTuple, hence a tuple too)."""
    return isinstance(prompt, (list, tuple)) and not hasattr(prompt, "input_ids")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


class Engine:
    """Continuous batching over `max_slots` cache slots of `max_len` positions (prompt + new tokens).

        engine = Engine(model, max_slots=8, max_len=1024, speculative="mtp")
        rid = engine.submit([1, 2, 3], max_new_tokens=32, sampling=SamplingParams(temperature=0.7, seed=1))
        for rid, new_tokens, finished in engine.stream(): ...   # or: outputs = engine.run()

    `speculative="mtp"` drafts with the model's first MTP depth (`speculative` module). `mesh` / `rules`: run
    under `ernie_jax.sharding.activate(mesh, rules)` (cache sharded like the activations). `unstack_layers`
    (default: on the CPU backend): decode on a copy of the decoder's weights split per layer, unrolled, as
    MaxText decodes with `scan_layers=False` (`LayerStack`); it costs the decoder's weights once more in memory.
    `kv_cache`: how the cache stores K / V, e.g. `KVCacheConfig(bits=8, hadamard=True)` (int8 codes with
    per-token scales after a randomised Hadamard rotation; `ernie_jax.quantization.kv_cache`); default the
    compute dtype. The MTP depth's cache follows the same scheme.
    """

    def __init__(self, model: nnx.Module, *, max_slots: int = 8, max_len: int | None = None,
                 speculative: str | None = None, chunk: int = 8, mesh=None, rules=None,
                 unstack_layers: bool | None = None, kv_cache: KVCacheConfig | None = None):
        c = model.config
        kv_cache = resolve_kv_cache(kv_cache, c.head_dim)
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {SPECULATIVE}, got {speculative!r}")
        if speculative == "mtp" and not (c.num_nextn_predict_layers and hasattr(model, "mtp")):
            raise ValueError("speculative='mtp' needs a model with MTP weights (config.num_nextn_predict_layers "
                             f"> 0); this model has num_nextn_predict_layers={c.num_nextn_predict_layers}")
        max_len = min(c.max_position_embeddings, 2048) if max_len is None else max_len
        if not 1 <= max_len <= c.max_position_embeddings:
            raise ValueError(f"max_len must be in [1, max_position_embeddings={c.max_position_embeddings}], "
                             f"got {max_len}")
        if max_slots < 1 or chunk < 1:
            raise ValueError(f"max_slots and chunk must be >= 1, got {max_slots} and {chunk}")
        self.model, self.config = model, c
        self.max_slots, self.max_len, self.chunk, self.spec = max_slots, max_len, chunk, speculative == "mtp"
        self.kv_cache = kv_cache
        self._ctx = (lambda: activate(mesh, rules or "dp")) if mesh is not None else contextlib.nullcontext
        self._graphdef, self._state = nnx.split(model)
        if unstack_layers is None:
            unstack_layers = jax.default_backend() == "cpu"
        self._layers = model.decoder.unstack_layers() if unstack_layers else None
        with self._ctx():
            self._cache, self._slots = _init(c, max_slots, max_len, self.spec, c.vocab_size, kv_cache)
        self._owner: list[Request | None] = [None] * max_slots
        self._queue: list[Request] = []
        self._next_id = 0
        self.requests: dict[int, Request] = {}
        self.stats = dict(prefill_tokens=0, prefill_s=0.0, decode_s=0.0, generated_tokens=0, forwards=0,
                          accepted=0)

    # --- requests -------------------------------------------------------------------------------------------

    def submit(self, prompt, *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               eos_token_id: int | None = None, stop_sequences: Sequence[Sequence[int]] = ()) -> int:
        """Queues a prompt (token ids, or an `EncodedPrompt` for VL models) -> its request id."""
        from ernie_jax.inference.generate import check_prompt  # noqa: PLC0415 (validation lives with the API)
        check_prompt(self.model, prompt, max_new_tokens, self.max_len, "prompt")
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if eos_token_id is not None and not 0 <= eos_token_id < self.config.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {self.config.vocab_size})")
        stops = tuple(tuple(int(t) for t in s) for s in stop_sequences)
        if any(len(s) == 0 for s in stops):
            raise ValueError("stop_sequences must not contain an empty sequence")
        req = Request(self._next_id, prompt, max_new_tokens, sampling, eos_token_id, stops)
        self._next_id += 1
        self.requests[req.id] = req
        self._queue.append(req)
        return req.id

    # --- running --------------------------------------------------------------------------------------------

    def _admit(self) -> list[tuple[int, list[int], bool]]:
        free = [i for i, r in enumerate(self._owner) if r is None]
        events = []
        while free and self._queue:
            take = 0  # consecutive text prompts prefill together; a VL prompt alone
            while take < min(len(free), len(self._queue)) and _is_text(self._queue[take].prompt):
                take += 1
            batch = [self._queue.pop(0) for _ in range(max(take, 1))]
            rows, free = free[:len(batch)], free[len(batch):]
            events += self._prefill(batch, rows)
        return events

    def _prefill(self, batch: list[Request], rows: list[int]) -> list[tuple[int, list[int], bool]]:
        m = 1 if len(batch) == 1 else _pow2(len(batch), 1)
        p = min(_pow2(max(r.num_prompt_tokens for r in batch)), self.max_len)
        ids = np.zeros((m, p), np.int32)
        lengths = np.ones((m,), np.int32)
        slot_ids = np.full((m,), self.max_slots, np.int32)  # padding rows: dropped
        new = {f: np.zeros((m,), dt) for f, dt in (("seed", np.uint32), ("temperature", np.float32),
                                                    ("top_k", np.int32), ("max_new", np.int32))}
        new["top_p"], new["eos"] = np.ones((m,), np.float32), np.full((m,), -1, np.int32)
        mm = None
        for j, (r, row) in enumerate(zip(batch, rows)):
            prompt = r.prompt if _is_text(r.prompt) else r.prompt.input_ids
            ids[j, :len(prompt)], lengths[j], slot_ids[j] = prompt, len(prompt), row
            sp = r.sampling
            new["seed"][j], new["temperature"][j], new["top_k"][j], new["top_p"][j] = (
                sp.seed, sp.temperature, sp.top_k, sp.top_p)
            new["max_new"][j] = r.max_new_tokens
            new["eos"][j] = -1 if r.eos_token_id is None else r.eos_token_id
            if not _is_text(r.prompt):
                mm = _vl_arrays(r.prompt, p)
            self._owner[row] = r
        t0 = time.perf_counter()
        with self._ctx():
            self._cache, self._slots, first = _prefill(
                self._graphdef, self._state, self._cache, self._slots, jnp.asarray(ids), jnp.asarray(lengths),
                jnp.asarray(slot_ids), {k: jnp.asarray(v) for k, v in new.items()}, mm, spec=self.spec)
            first = np.asarray(first)
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.stats["prefill_tokens"] += int(sum(r.num_prompt_tokens for r in batch))
        return [self._append(r, row, [int(first[j])]) for j, (r, row) in enumerate(zip(batch, rows))]

    def _append(self, r: Request, row: int, tokens: list[int]) -> tuple[int, list[int], bool]:
        """Host side of a slot's new tokens: cut at eos / a stop sequence / max_new_tokens; frees the slot."""
        added = []
        for t in tokens:
            if r.done:
                break
            r.output.append(t)
            added.append(t)
            if (t == r.eos_token_id or len(r.output) >= r.max_new_tokens
                    or any(r.output[-len(s):] == list(s) for s in r.stop_sequences)):
                r.done = True
        if r.done:
            self._owner[row] = None
            self.stats["generated_tokens"] += len(r.output)
        return r.id, added, r.done

    def step(self) -> list[tuple[int, list[int], bool]]:
        """Admits waiting requests into free slots, then decodes one chunk -> [(request id, new tokens, done)]."""
        events = self._admit()
        busy = [i for i, r in enumerate(self._owner) if r is not None]
        if not busy:
            return events
        stop = np.array([r is None for r in self._owner])
        fn = _speculative_chunk if self.spec else _decode_chunk
        t0 = time.perf_counter()
        with self._ctx():
            self._cache, self._slots, out = fn(self._graphdef, self._state, self._cache, self._slots,
                                               jnp.asarray(stop), self._layers, chunk=self.chunk)
            out = np.asarray(out).reshape(self.max_slots, -1)
            forwards, accepted = np.asarray(self._slots.forwards), np.asarray(self._slots.accepted)
        self.stats["decode_s"] += time.perf_counter() - t0
        for i in busy:
            r = self._owner[i]
            r.forwards, r.accepted = int(forwards[i]), int(accepted[i])
            events.append(self._append(r, i, [int(t) for t in out[i] if t >= 0]))
            if r.done:
                self.stats["forwards"] += r.forwards
                self.stats["accepted"] += r.accepted
        return events

    def stream(self) -> Iterator[tuple[int, list[int], bool]]:
        """Runs until every submitted request has finished, yielding (request id, new tokens, done)."""
        while self._queue or any(r is not None for r in self._owner):
            yield from self.step()

    def run(self) -> dict[int, list[int]]:
        """Runs every submitted request to the end -> {request id: new tokens}."""
        for _ in self.stream():
            pass
        return {i: r.output for i, r in self.requests.items()}

    def summary(self) -> dict[str, float]:
        """Totals over the finished requests: tokens, forwards, and for speculative decoding the acceptance
        rate (accepted drafts / drafts) and generated tokens per main-model forward (the first token of each
        request comes from its prefill and is not counted)."""
        s = dict(self.stats)
        fw = max(s["forwards"], 1)
        s["acceptance_rate"] = s["accepted"] / fw if self.spec else 0.0
        s["tokens_per_forward"] = (s["forwards"] + s["accepted"]) / fw
        return s


def _vl_arrays(prompt, length: int) -> dict[str, jax.Array]:
    """One VL prompt's processor arrays, right-padded to `length` (flat image / video layout)."""
    out = {}
    for k in ("mm_token_type_ids", "moe_mm_token_type_ids"):
        a = np.zeros((1, length), np.int32)
        a[0, :len(prompt.input_ids)] = getattr(prompt, k)
        out[k] = jnp.asarray(a)
    for kind, pix, grid in (("images", "pixel_values", "image_grid_thw"),
                            ("videos", "pixel_values_videos", "video_grid_thw")):
        items = getattr(prompt, kind)
        if items:
            out[pix] = jnp.asarray(np.concatenate([v.patches for v in items]), jnp.float32)
            out[grid] = jnp.asarray(np.stack([v.grid_thw for v in items]), jnp.int32)
    return out
