import json
import os

import jax
import numpy as np
import pytest

from ernie_jax import count_params, create_model, get_preset

# transformers' meta-device parameter counts of the released models (a copy of shared/reference)
COUNTS = json.load(open(os.path.join(os.path.dirname(__file__), "..", "data", "hf_configs", "param_counts.json")))


@pytest.mark.parametrize("name", ["ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b",
                                  "ernie-4.5-vl-28b-a3b", "ernie-4.5-vl-424b-a47b"])
def test_released_param_count_exact(name):
    """Counted abstractly with jax.eval_shape (no memory); transformers has no MTP block, so leave it out."""
    assert count_params(get_preset(name, num_nextn_predict_layers=0)) == COUNTS[name]


def test_count_matches_materialised_model():
    c = get_preset("tiny-test", tie_word_embeddings=False, use_bias=True)
    from flax import nnx
    model = create_model(c)
    assert count_params(c) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_seed_determinism():
    a = create_model(get_preset("tiny-test"), seed=7)
    b = create_model(get_preset("tiny-test"), seed=7)
    c = create_model(get_preset("tiny-test"), seed=8)
    np.testing.assert_array_equal(np.asarray(a.embed[...]), np.asarray(b.embed[...]))
    assert not np.allclose(np.asarray(a.embed[...]), np.asarray(c.embed[...]))


def test_init_statistics_follow_transformers():
    c = get_preset("tiny", initializer_range=0.02, use_bias=True)
    m = create_model(c)
    assert abs(float(np.std(np.asarray(m.embed[...]))) - 0.02) < 0.002
    assert np.all(np.asarray(m.final_norm.scale[...]) == 1)
    assert np.all(np.asarray(m.decoder.stacks[0].layers.attn.bq[...]) == 0)
