import io
import re
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax import get_preset
from ernie_jax.config import REMAT_POLICIES
from ernie_jax.model import abstract_model, create_model
from ernie_jax.model.attention import AttentionMask
from ernie_jax.model.decoder import DecoderLayer
from ernie_jax.model.remat import POLICIES, remat
from ernie_jax.model.rope import rope_angles


def test_config_and_policy_table_agree():
    assert set(POLICIES) == set(REMAT_POLICIES)


def _saved_names(policy):
    c = get_preset("tiny-test")
    g, st = nnx.split(DecoderLayer(c, "dense", rngs=nnx.Rngs(0)))
    ang = rope_angles(jnp.arange(4)[None], c.head_dim, c.rope_theta)
    f = remat(lambda st, x: nnx.merge(g, st)(x, ang, AttentionMask())[0].sum(), policy)
    buf = io.StringIO()
    with redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, st, jnp.ones((1, 4, c.hidden_size)))
    return set(re.findall(r"named '(\w+)'", buf.getvalue()))


@pytest.mark.parametrize("policy, names", [
    ("full", set()),
    ("save_qkv", {"query_proj", "key_proj", "value_proj"}),
    ("save_attn", {"query_proj", "key_proj", "value_proj", "attention_out", "out_proj"}),
    # mlp_out is allowed too, but the backward of this one-layer function never needs it
    ("save_attn_mlp", {"query_proj", "key_proj", "value_proj", "attention_out", "out_proj", "mlp_gate", "mlp_up"}),
])
def test_policy_saves_exactly_the_named_activations(policy, names):
    assert _saved_names(policy) == names


def test_all_policies_give_the_same_gradients():
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 8)))
    st = nnx.state(create_model(get_preset("tiny-test"), seed=0))  # one set of weights for every policy
    grads = {}
    for policy in REMAT_POLICIES:
        g = nnx.graphdef(abstract_model(get_preset("tiny-test", remat_policy=policy)))  # the policy is static
        loss = lambda st: jnp.mean(nnx.merge(g, st)(ids).logits ** 2)  # noqa: E731
        grads[policy] = jax.jit(jax.grad(loss))(st)
    ref = jax.tree.leaves(grads["none"])
    for policy, gr in grads.items():
        for a, b in zip(ref, jax.tree.leaves(gr)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=policy)
