import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from ernie_jax import get_preset
from ernie_jax.model import abstract_model, create_model
from random_weights import random_model


def _ids(b, s, seed=0, vocab=128):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (b, s)), jnp.int32)


def test_packed_documents_equal_separate_runs():
    model = create_model(get_preset("tiny-test"), seed=1)
    a, b = _ids(1, 5, 1), _ids(1, 3, 2)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.asarray([[1] * 5 + [2] * 3])
    pos = jnp.asarray([list(range(5)) + list(range(3))])
    out = model(packed, positions=pos, segment_ids=seg).logits
    np.testing.assert_allclose(np.asarray(out[:, :5]), np.asarray(model(a).logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[:, 5:]), np.asarray(model(b).logits), atol=1e-5)


def test_right_padding_does_not_change_real_tokens():
    model = create_model(get_preset("tiny-test"), seed=1)
    ids = _ids(2, 6)
    am = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6])
    out = model(ids, attention_mask=am).logits
    np.testing.assert_allclose(np.asarray(out[0, :4]), np.asarray(model(ids[:1, :4]).logits[0]), atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_tied_and_untied_heads():
    tied = create_model(get_preset("tiny-test"), seed=0)
    assert not hasattr(tied, "lm_head")
    h = tied(_ids(1, 4)).hidden_states
    np.testing.assert_allclose(np.asarray(tied(_ids(1, 4)).logits), np.asarray(h @ tied.embed[...].T), atol=1e-5)
    untied = abstract_model(get_preset("tiny-test", tie_word_embeddings=False))  # shapes only
    assert untied.lm_head.get_value().shape == (32, 128)


def test_bf16_compute_close_to_fp32():
    ids = _ids(2, 16)
    f32 = create_model(get_preset("tiny-test"), seed=0)
    bf16_graphdef, bf16_state = nnx.split(abstract_model(get_preset("tiny-test", dtype="bfloat16")))
    assert bf16_state["embed"].get_value().dtype == jnp.float32  # fp32 master parameters, bf16 compute
    bf16 = nnx.merge(bf16_graphdef, nnx.state(f32))  # the same weights
    a, b = f32(ids).logits, bf16(ids).logits
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())


def test_jit_grad_is_finite_and_nonzero():
    model = random_model(get_preset("tiny-test", use_bias=True), seed=0)
    g, st = nnx.split(model)
    ids = _ids(2, 8)

    def loss(st):
        logits = nnx.merge(g, st)(ids[:, :-1]).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(st)
    for path, v in nnx.to_flat_state(grads):
        arr = np.asarray(v.get_value())
        assert np.isfinite(arr).all(), path
        assert np.abs(arr).max() > 0, path
