import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax import get_preset
from ernie_jax.model import create_model
from ernie_jax.model.attention import AttentionMask
from ernie_jax.model.decoder import DecoderLayer, layer_segments
from ernie_jax.model.rope import rope_angles
from ernie_jax.sharding import logical_axes


def test_scan_equals_a_python_loop_over_layers():
    c = get_preset("tiny-test", num_hidden_layers=3)
    model = create_model(c, seed=3)
    x = jax.random.normal(jax.random.key(0), (2, 5, c.hidden_size))
    ang = rope_angles(jnp.broadcast_to(jnp.arange(5), (2, 5)), c.head_dim, c.rope_theta)
    mask = AttentionMask()
    stack = model.decoder.stacks[0]
    scanned, stats = stack(x, ang, mask)
    assert stats is None  # dense layers report no router statistics
    g, st = nnx.split(stack.layers)
    h = x
    for i in range(3):
        layer = nnx.merge(g, jax.tree.map(lambda a: a[i], st))
        h, _ = layer(h, ang, mask)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(h), atol=1e-6)
    # the layers really differ (independent init per layer)
    wq = st["attn"]["wq"].get_value()
    assert not np.allclose(wq[0], wq[1])


def test_stacked_params_are_named_layers_first():
    model = create_model(get_preset("tiny-test"))
    for _, v in nnx.to_flat_state(nnx.state(model.decoder, nnx.Param)):
        assert logical_axes(v)[0] == "layers"
        assert v.get_value().shape[0] == 2


def _hlo_size(num_layers):
    c = get_preset("tiny-test", num_hidden_layers=num_layers)
    from ernie_jax.model import abstract_model
    g, st = nnx.split(abstract_model(c))
    f = jax.jit(lambda st, ids: nnx.merge(g, st)(ids).logits)
    return len(f.lower(st, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text())


def test_program_size_does_not_grow_with_depth():
    small, deep = _hlo_size(2), _hlo_size(24)
    assert deep < 1.05 * small, (small, deep)


def test_layer_segments():
    assert layer_segments(get_preset("ernie-4.5-0.3b")) == [("dense", 18)]
    assert layer_segments(get_preset("ernie-4.5-21b-a3b")) == [("dense", 1), ("moe", 27)]
    assert layer_segments(get_preset("ernie-4.5-300b-a47b")) == [("dense", 3), ("moe", 51)]
    c = get_preset("tiny-moe-test", num_hidden_layers=6, moe_layer_start_index=1, moe_layer_end_index=3)
    assert layer_segments(c) == [("dense", 1), ("moe", 3), ("dense", 2)]
    # a break splits a run of one kind; a break at a kind change adds nothing
    assert layer_segments(c.replace(layer_stack_breaks=(1, 3, 5))) == [("dense", 1), ("moe", 2), ("moe", 1),
                                                                        ("dense", 1), ("dense", 1)]


def test_unknown_layer_kind():
    import pytest
    with pytest.raises(ValueError, match="unknown layer kind"):
        DecoderLayer(get_preset("tiny-test"), "sparse", rngs=nnx.Rngs(0))
