"""The engine against a full-recompute greedy oracle; batch invariance; continuous batching (requests joining
while others decode) equal to solo runs, greedy and sampled; eos / stop sequences / max_new_tokens; sharded
decoding on the 8-device CPU mesh; an int8 KV cache giving the fp cache's greedy tokens; bad input rejected
before anything compiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax import get_preset
from ernie_jax.inference import Engine, KVCacheConfig, SamplingParams, engine as engine_module
from ernie_jax.model import abstract_model, create_model
from ernie_jax.processor.prompt import SpecialTokens, Vision, encode_prompt
from ernie_jax.sharding import MeshConfig, make_mesh, param_shardings, resolve_rules
from random_weights import random_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]


@pytest.fixture(scope="module")
def model():
    return create_model(get_preset("tiny-test", initializer_range=0.1), seed=1)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def _recompute_greedy(model, prompt, n):
    """The oracle: every new token is the argmax of a full forward over the whole sequence so far (one buffer
    of fixed length: causal attention keeps the unwritten tail invisible)."""
    g, st = nnx.split(model)
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        buf[0, t] = int(np.argmax(np.asarray(_full_logits(g, st, jnp.asarray(buf)))[0, t - 1]))
    return buf[0, len(prompt):].tolist()


def test_greedy_batch_equals_recompute_oracle(model):
    """Prompts of different lengths in one batch: each equals its own full-recompute greedy continuation."""
    out = ernie_jax.generate(model, PROMPTS, max_new_tokens=8, eos_token_id=None)
    for p, o in zip(PROMPTS, out):
        assert o == _recompute_greedy(model, p, 8)
    assert len({t for o in out for t in o}) > 4  # not one repeated token


def test_continuous_batching_equals_solo_runs(model):
    """Six requests, two slots, chunks of 3 steps: requests join as others finish (different lengths and
    budgets), greedy and sampled ones mixed; each output equals the request run alone."""
    reqs = [(PROMPTS[0], 7, SamplingParams()), (PROMPTS[1], 3, SamplingParams(temperature=1.0, seed=5)),
            (PROMPTS[2], 9, SamplingParams(temperature=0.8, top_k=20, seed=6)), (PROMPTS[3], 2, SamplingParams()),
            ([7, 8], 5, SamplingParams(temperature=1.2, top_p=0.9, seed=7)), ([9] * 6, 4, SamplingParams())]
    eng = Engine(model, max_slots=2, max_len=32, chunk=3)
    ids = [eng.submit(p, max_new_tokens=n, sampling=s) for p, n, s in reqs]
    joined_while_busy = False
    while eng._queue or any(eng._owner):
        busy_before = sum(r is not None for r in eng._owner)
        queued_before = len(eng._queue)
        eng.step()
        joined_while_busy |= 0 < busy_before < 2 and len(eng._queue) < queued_before
    assert joined_while_busy
    for rid, (p, n, s) in zip(ids, reqs):
        solo = Engine(model, max_slots=1, max_len=32, chunk=5)
        solo.submit(p, max_new_tokens=n, sampling=s)
        assert eng.requests[rid].output == solo.run()[0], rid
        assert len(eng.requests[rid].output) == n


def test_sampled_tokens_do_not_depend_on_the_batch(model):
    alone = ernie_jax.generate(model, [PROMPTS[2]], max_new_tokens=6, temperature=1.0, top_p=0.95, seed=11)
    batched = ernie_jax.generate(model, PROMPTS[:3], max_new_tokens=6, temperature=1.0, top_p=0.95, seed=9)
    assert batched[2] == alone[0]  # prompt i samples with seed + i
    assert batched[0] != batched[1]


def test_stop_on_eos_stop_sequence_and_budget(model):
    full = ernie_jax.generate(model, [PROMPTS[0]], max_new_tokens=8, eos_token_id=None)[0]
    eos = full[3]
    cut = full[:full.index(eos) + 1]  # eos included, nothing after it
    assert ernie_jax.generate(model, [PROMPTS[0]], max_new_tokens=8, eos_token_id=eos)[0] == cut
    stop = full[1:3]
    assert ernie_jax.generate(model, [PROMPTS[0]], max_new_tokens=8, eos_token_id=None,
                              stop_sequences=[[999], stop])[0][-2:] == stop
    # per row: the other prompt in the batch keeps going
    both = ernie_jax.generate(model, [PROMPTS[0], PROMPTS[3]], max_new_tokens=8, eos_token_id=eos)
    assert both[0] == cut
    other = ernie_jax.generate(model, [PROMPTS[3]], max_new_tokens=8, eos_token_id=None)[0]
    assert both[1] == (other[:other.index(eos) + 1] if eos in other else other)


def test_sharded_decode_equals_one_device(model):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    g, st = nnx.split(model)  # the same weights, laid out on the mesh by the rules
    sharded = nnx.merge(g, jax.device_put(st, param_shardings(st, mesh, resolve_rules("fsdp_tensor"))))
    assert len(sharded.embed[...].sharding.device_set) == 8
    kw = dict(max_new_tokens=6, eos_token_id=None)
    got = ernie_jax.generate(sharded, PROMPTS, mesh=mesh, rules="fsdp_tensor", **kw)
    assert got == ernie_jax.generate(model, PROMPTS, **kw)


def _vl_prompt():
    cfg = get_preset("tiny-vl-test")
    image = Vision.from_image(np.zeros((28, 28, 3), np.uint8))
    return encode_prompt([[5], image, [6]], SpecialTokens.from_config(cfg))


@pytest.mark.parametrize("prompts, kw, match", [
    ([[1] * 250], dict(max_new_tokens=10), "max_position_embeddings=256"),
    ([[1, 2], [3, 128]], dict(max_new_tokens=2), r"prompts\[1\] has token id 128"),
    ([[1, 2], []], dict(max_new_tokens=2), r"prompts\[1\] is empty"),
    ([], dict(max_new_tokens=2), "non-empty list"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1]], dict(max_new_tokens=2, top_p=0.0), "top_p"),
    ([[1]], dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    ([[1]], dict(max_new_tokens=2, speculative="mtp"), "num_nextn_predict_layers=0"),
    ([[1]], dict(max_new_tokens=2, speculative="eagle"), "speculative"),
    ([[1]], dict(max_new_tokens=2, kv_cache="int8"), "kv_cache must be a KVCacheConfig or None, got str 'int8'"),
    ([[1]], dict(max_new_tokens=2, kv_cache=dict(bits=8)), "kv_cache must be a KVCacheConfig"),
    ("vl", dict(max_new_tokens=2), "text model"),
])
def test_bad_input_is_rejected_before_compiling(model, monkeypatch, prompts, kw, match):
    def no_compile(*a, **k):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(engine_module, "_init", no_compile)
    with pytest.raises(ValueError, match=match):
        ernie_jax.generate(model, [_vl_prompt()] if prompts == "vl" else prompts, **kw)


def test_hadamard_cache_needs_a_power_of_two_head_dim(monkeypatch):
    monkeypatch.setattr(engine_module, "_init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))
    model = abstract_model(get_preset("tiny-test", head_dim=24))  # no weights: nothing may run on them
    kv = KVCacheConfig(bits=4, hadamard=True)
    with pytest.raises(ValueError, match=r"kv_cache=KVCacheConfig\(bits=4, hadamard=True, seed=0\): .*power of two, "
                                         r"got head_dim=24"):
        ernie_jax.generate(model, [[1, 2]], max_new_tokens=2, kv_cache=kv)
    with pytest.raises(ValueError, match="power of two"):
        Engine(model, kv_cache=kv)


def test_int8_cache_greedy_equals_fp_cache(model, monkeypatch):
    """The same greedy tokens from an int8 cache (codes + per-token scales, read dequantized) as from the fp32
    one, for prompts of different lengths in one batch."""
    kw = dict(max_new_tokens=8, eos_token_id=None)
    fp = ernie_jax.generate(model, PROMPTS, **kw)
    made, init = [], engine_module._init
    monkeypatch.setattr(engine_module, "_init", lambda *a, **k: made.append(init(*a, **k)) or made[-1])
    assert ernie_jax.generate(model, PROMPTS, kv_cache=KVCacheConfig(bits=8), **kw) == fp
    (cache, _), = made
    assert cache.scheme == KVCacheConfig(bits=8) and cache.k[0].codes.dtype == jnp.int8


def test_engine_rejects_a_prompt_past_its_cache(model):
    eng = Engine(model, max_slots=1, max_len=16)
    with pytest.raises(ValueError, match="max_len=16"):
        eng.submit([1] * 10, max_new_tokens=7)


def test_vl_prompts_share_the_engine_with_text_prompts():
    """An image prompt and a text-only one decode side by side (VL prompts prefill one by one, then decode
    together); each equals a full-recompute greedy oracle over the VL model."""
    # the grouped matmul that compiles fastest on CPU (the prompts, not the expert kernel, are under test)
    model = random_model(get_preset("tiny-vl-test", moe_gmm_impl="ragged_dot"), seed=2, std=0.3)
    tokens = SpecialTokens.from_config(model.config)
    rs = np.random.RandomState(0)
    image = Vision.from_image(rs.randint(0, 256, (56, 84, 3), dtype=np.uint8))
    prompts = [encode_prompt([[5, 6, 7], image, [8, 9]], tokens), encode_prompt([[12, 13, 14, 15]], tokens)]
    out = ernie_jax.generate(model, prompts, max_new_tokens=6, eos_token_id=None)
    g, st = nnx.split(model)
    fwd = jax.jit(lambda st, ids, mm: nnx.merge(g, st)(ids, **mm).logits)
    for enc, got in zip(prompts, out):
        p, total = len(enc.input_ids), len(enc.input_ids) + 6
        pad = lambda a: jnp.asarray(np.pad(np.asarray(a), (0, total - p))[None])  # noqa: E731
        mm = {"mm_token_type_ids": pad(enc.mm_token_type_ids), "moe_mm_token_type_ids": pad(enc.moe_mm_token_type_ids)}
        if enc.images:
            mm.update(pixel_values=jnp.asarray(enc.images[0].patches, jnp.float32),
                      image_grid_thw=jnp.asarray([enc.images[0].grid_thw]))
        buf = np.zeros((1, total), np.int32)
        buf[0, :p] = enc.input_ids
        for t in range(p, total):  # causal: the unwritten tail is invisible to position t - 1
            buf[0, t] = int(np.argmax(np.asarray(fwd(st, jnp.asarray(buf), mm))[0, t - 1]))
        assert got == buf[0, p:].tolist()
    assert len({t for o in out for t in o}) > 3
