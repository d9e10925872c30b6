import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def test_multimodal_batch_matches_one_at_a_time():
    """Left-padded VL prompts with images of different sizes continue exactly as each prompt alone, and each
    new token is the argmax of a forward over the tokens before it."""
    from ernie_jax.inference.greedy import greedy_generate_multimodal
    from ernie_jax.processor.prompt import SpecialTokens, Vision, collate, encode_prompt
    cfg = get_preset("tiny-vl-test")
    model = create_model(cfg, seed=4)
    rs = np.random.RandomState(0)
    tok = SpecialTokens.from_config(cfg)
    prompts = [encode_prompt([[5, 6], Vision.from_image(rs.randint(0, 256, (56, 84, 3), np.uint8)), [7]], tok),
               encode_prompt([[9], Vision.from_image(rs.randint(0, 256, (84, 56, 3), np.uint8)), [10, 11, 12],
                              Vision.from_image(rs.randint(0, 256, (56, 56, 3), np.uint8))], tok)]
    batch = greedy_generate_multimodal(model, prompts, 3)
    alone = greedy_generate_multimodal(model, prompts[:1], 3)  # the shorter prompt: left-padded in the batch
    assert batch[0] == alone[0] and all(len(x) == 3 for x in batch)
    inp = {k: jnp.asarray(v) for k, v in collate([prompts[0]]).items()}
    g, st = nnx.split(model)
    logits = jax.jit(lambda st, inp: nnx.merge(g, st)(**inp).logits)(st, inp)  # (eager NNX: far slower)
    assert int(np.asarray(logits)[0, -1].argmax()) == batch[0][0]
