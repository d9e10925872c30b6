import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax import get_preset
from ernie_jax.inference import greedy_generate
from ernie_jax.model import create_model


def test_greedy_matches_argmax_of_full_forward():
    model = create_model(get_preset("tiny-test"), seed=2)
    prompt = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 4)), jnp.int32)
    out = np.asarray(greedy_generate(model, prompt, 5))
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out[:, :4], np.asarray(prompt))
    for t in range(4, 9):  # each new token is the argmax of the forward over the tokens before it
        logits = np.asarray(model(jnp.asarray(out[:, :t])).logits)
        np.testing.assert_array_equal(out[:, t], logits[:, -1].argmax(-1))


def test_bad_arguments():
    model = create_model(get_preset("tiny-test"))
    with pytest.raises(ValueError, match="prompt must be"):
        greedy_generate(model, jnp.zeros((3,), jnp.int32), 2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        greedy_generate(model, jnp.zeros((1, 250), jnp.int32), 10)


def test_ragged_prompts_match_one_at_a_time():
    """Left padding with masked keys and per-prompt positions gives each prompt's own greedy continuation."""
    from ernie_jax.inference import greedy_generate_ragged
    model = create_model(get_preset("tiny-test"), seed=3)
    prompts = [[5, 9, 17], [40, 2, 77, 31, 8, 99], [12]]
    got = greedy_generate_ragged(model, prompts, 4)
    for p, g in zip(prompts, got):
        alone = np.asarray(greedy_generate(model, jnp.asarray([p], jnp.int32), 4))[0, len(p):]
        assert g == alone.tolist()
    cut = greedy_generate_ragged(model, prompts[:1], 4, eos_id=got[0][1])
    assert cut[0] == got[0][:got[0].index(got[0][1])]
