"""Model-level quantization (ernie_jax/quantization/{model,quantized_weight,calibration}.py) against float64
numpy written here: each stored weight is the round-to-nearest of its own layer's weight, the quantized model
computes what the full-precision model computes on those values, W*A8 rounds each token's inputs to int8,
the routed experts' dropless and gathered paths agree with a per-token loop, GPTQ codes come from the
calibration Hessians, and the bytes are the codes plus the scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.inference import Engine
from ernie_jax.model import create_model
from ernie_jax.model.moe import Experts
from ernie_jax.model.router import Routing
from ernie_jax.presets import get_preset
from ernie_jax.quantization.calibration import capture_inputs, layer_hessians
from ernie_jax.quantization.model import quantize_model, weight_bytes
from ernie_jax.quantization.quantized_weight import QuantizedWeight
from ernie_jax.quantization.scheme import QuantScheme, WeightRule, get_scheme
from pallas_kernels.qmm import format as qformat

CFG = get_preset("tiny-moe-test", num_hidden_layers=4)  # layer 0 dense; 1-3 MoE (8 experts, top 2, 1 shared)
MIXED = QuantScheme("mixed", (WeightRule(("experts",), bits=2, group_size=8, symmetric=False, layers=(2, 4)),
                              WeightRule(("experts",), bits=8),
                              WeightRule(("attention", "mlp"), bits=4, group_size=16, symmetric=False),
                              WeightRule(("shared_experts",), bits=4)))


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=0)


@pytest.fixture(scope="module")
def mixed(model):
    """`model` quantized by MIXED (shared: quantizing it takes seconds of compiles)."""
    return quantize_model(model, MIXED)


def _logits(m, ids):
    """The model's logits, one compiled forward (an eager quantized forward dispatches every op alone)."""
    graphdef, state = nnx.split(m)
    return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).logits)(state, ids)


def params(m) -> dict:
    return nnx.to_pure_dict(nnx.state(m))


def rtn(w: np.ndarray, bits: int, g: int | None, symmetric: bool) -> np.ndarray:
    """Round to nearest of w [K, N] per group of g rows (None: per column), float64."""
    k, n = w.shape
    g = k if g is None or g >= k else g
    wg = np.asarray(w, np.float64).reshape(k // g, g, n)
    if symmetric:
        s = np.abs(wg).max(1, keepdims=True) / (2 ** (bits - 1) - 1)
        s = np.where(s > 0, s, 1.0)
        return (np.clip(np.round(wg / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * s).reshape(k, n)
    lo, hi = wg.min(1, keepdims=True), wg.max(1, keepdims=True)
    s = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0)
    return (np.clip(np.round((wg - lo) / s), 0, 2 ** bits - 1) * s + lo).reshape(k, n)


# layer -> (stack, slot): the original stacks [0] [1 2 3]; MIXED splits the MoE stack at layer 2
ORIGINAL = {0: (0, 0), 1: (1, 0), 2: (1, 1), 3: (1, 2)}
SPLIT = {0: (0, 0), 1: (1, 0), 2: (2, 0), 3: (2, 1)}
# (path in the layer, layers, K of its [K, N] view, layout (bits, group, symmetric) per layer)
CASES = [("attn/wq", (0, 3), 32, lambda i: (4, 16, False)),
         ("attn/wo", (1,), 64, lambda i: (4, 16, False)),  # [heads, head_dim, H]: K = 4 * 16
         ("mlp/wi_up", (0,), 32, lambda i: (4, 16, False)),
         ("mlp/shared/wo", (2,), 16, lambda i: (4, None, True)),
         ("mlp/experts/wi_gate", (1, 2, 3), 32, lambda i: (8, None, True) if i < 2 else (2, 8, False))]


def _get(tree, rel):
    for part in rel.split("/"):
        tree = tree[part]
    return tree


def expected_values(m) -> dict:
    """{(layer, path): values [*shape]} of the numpy oracle for the CASES, from the unquantized model."""
    old = params(m)["decoder"]["stacks"]
    out = {}
    for rel, layers, k, layout in CASES:
        for i in layers:
            s, j = ORIGINAL[i]
            w = np.asarray(_get(old[s]["layers"], rel))[j]
            lead = w.shape[:1] if rel.startswith("mlp/experts") else ()
            mats = w.reshape(lead + (k, -1))
            deq = np.stack([rtn(mm, *layout(i)) for mm in mats]) if lead else rtn(mats, *layout(i))
            out[(i, rel)] = deq.reshape(w.shape)
    return out


def test_each_layer_stores_the_round_to_nearest_of_its_own_weight(model, mixed):
    q = mixed
    assert q.config.layer_stack_breaks == (2,)
    new = params(q)["decoder"]["stacks"]
    for (i, rel), want in expected_values(model).items():
        s, j = SPLIT[i]
        w = _get(new[s]["layers"], rel)
        assert isinstance(w, QuantizedWeight), (i, rel)
        got = jax.tree.map(lambda a: a[j], w).dequantize()
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6, err_msg=f"layer {i} {rel}")
    with pytest.raises(ValueError, match=r"already quantized \(decoder/stacks/0/layers/attn/wk holds a "):
        quantize_model(q, MIXED)
    # the input is untouched: still arrays, still one MoE stack
    assert model.config.layer_stack_breaks == () and len(model.decoder.stacks) == 2
    assert not any(isinstance(v, QuantizedWeight) for v in jax.tree.leaves(
        params(model), is_leaf=lambda x: isinstance(x, QuantizedWeight)))


def dequantized_model(q):
    """The full-precision model whose projections are the quantized model's dequantized values."""
    graphdef, state = nnx.split(q)
    tree = jax.tree.map(lambda v: jax.vmap(QuantizedWeight.dequantize)(v) if isinstance(v, QuantizedWeight) else v,
                        nnx.to_pure_dict(state), is_leaf=lambda x: isinstance(x, QuantizedWeight))
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def test_quantized_forward_and_cached_decode_compute_the_dequantized_model(model, mixed):
    q = mixed
    ref = dequantized_model(q)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(ref)))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    got, want = _logits(q, ids), _logits(ref, ids)  # prefill-sized: the experts' dropless path
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got - _logits(model, ids)))) > 1e-3  # and they differ from the original
    # greedy decoding through the cache (one token per row: the experts' gathered path) = the fp model's
    prompts = [[5, 9, 11, 3], [7, 1]]
    outs = []
    for m in (q, ref):
        e = Engine(m, max_slots=2, max_len=32, unstack_layers=False)  # scanned stacks: a quicker compile
        rids = [e.submit(p, max_new_tokens=6) for p in prompts]
        res = e.run()
        outs.append([res[r] for r in rids])
    assert outs[0] == outs[1]


def test_w8a8_matmul_rounds_each_token_to_int8():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32) * np.array([[1.0], [3.0], [0.01], [10.0], [0.5]], np.float32)
    qt = qformat.quantize(jnp.asarray(w), 8)
    w_hat = rtn(w, 8, None, True)
    s = np.abs(x).max(1, keepdims=True) / 127.0
    x_hat = np.clip(np.round(x / s), -127, 127) * s
    a8 = QuantizedWeight(qt=qt, shape=(64, 24), activation_bits=8).matmul(jnp.asarray(x))
    a16 = QuantizedWeight(qt=qt, shape=(64, 24)).matmul(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(a8), x_hat @ w_hat, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(a16), x @ w_hat, rtol=1e-5, atol=1e-4)
    assert np.abs(np.asarray(a8) - np.asarray(a16)).max() > 1e-3


@pytest.mark.parametrize("activation_bits", [None, 8])
def test_quantized_experts_dropless_and_gathered_match_a_token_loop(activation_bits):
    e, h, i, t, k = 4, 32, 16, 6, 2
    ex = Experts(e, h, i, act="silu", std=0.5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    raw = {n: np.asarray(getattr(ex, n)[...]) for n in ("wi_gate", "wi_up", "wo")}
    for n, w in raw.items():
        qt = jax.vmap(lambda m: qformat.quantize(m, 4, 16, symmetric=False))(jnp.asarray(w))
        getattr(ex, n).set_value(QuantizedWeight(qt=qt, shape=w.shape, n_lead=1, activation_bits=activation_bits))
    deq = {n: np.stack([rtn(m, 4, 16, False) for m in w]) for n, w in raw.items()}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((t, h)).astype(np.float32)
    ids = np.array([[0, 3], [1, 3], [3, 2], [0, 1], [2, 0], [3, 1]], np.int32)
    wts = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    r = Routing(logits=None, probs=None, expert_ids=jnp.asarray(ids), weights=jnp.asarray(wts))

    def aq(v):
        if activation_bits is None:
            return v
        s = np.abs(v).max(-1, keepdims=True) / 127.0
        return np.clip(np.round(v / s), -127, 127) * s

    want = np.zeros((t, h))
    for a in range(t):
        for c in range(k):
            g = ids[a, c]
            xin = aq(x[a].astype(np.float64))
            gate = xin @ deq["wi_gate"][g]
            hid = gate / (1 + np.exp(-gate)) * (xin @ deq["wi_up"][g])
            want[a] += wts[a, c] * (aq(hid) @ deq["wo"][g])
    assert ex.quantized
    for path in (ex.dropless(jnp.asarray(x), r, impl="auto", tile=0), ex.gathered(jnp.asarray(x), r)):
        np.testing.assert_allclose(np.asarray(path), want, rtol=1e-4, atol=1e-5)


def test_gptq_codes_come_from_the_calibration_hessians(model):
    rng = np.random.default_rng(2)
    batches = [{"tokens": rng.integers(0, CFG.vocab_size, (4, 32)).astype(np.int32)} for _ in range(2)]
    hs = layer_hessians(model, batches)
    scheme = QuantScheme("w2", (WeightRule(("attention", "experts"), bits=2, group_size=16, symmetric=False),))
    qg = quantize_model(model, QuantScheme("w2", scheme.rules, method="gptq"), hessians=hs)
    qr = quantize_model(model, scheme)
    x = capture_inputs(model, batches[0])[(1, "attn/wq")].astype(np.float64)
    w = np.asarray(params(model)["decoder"]["stacks"][1]["layers"]["attn"]["wq"][0]).reshape(32, -1)

    def err(q):
        wq = jax.tree.map(lambda a: a[0], params(q)["decoder"]["stacks"][1]["layers"]["attn"]["wq"])
        w_hat = np.asarray(wq.dequantize()).reshape(32, -1)
        return np.sum((x @ w - x @ w_hat) ** 2) / np.sum((x @ w) ** 2)

    assert err(qg) < 0.95 * err(qr)
    # the routed experts have no Hessian: rounded to nearest under both
    ge = params(qg)["decoder"]["stacks"][1]["layers"]["mlp"]["experts"]["wo"].qt.codes
    re_ = params(qr)["decoder"]["stacks"][1]["layers"]["mlp"]["experts"]["wo"].qt.codes
    np.testing.assert_array_equal(np.asarray(ge), np.asarray(re_))
    with pytest.raises(ValueError, match="uses GPTQ: pass the calibration hessians"):
        quantize_model(model, QuantScheme("w2", scheme.rules, method="gptq"))


def test_capture_inputs_sees_each_projections_input(model):
    ids = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
    seg = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)  # 3 padding tokens left out
    xs = capture_inputs(model, {"tokens": ids, "segment_ids": seg})
    p = params(model)
    emb = np.asarray(p["embed"], np.float64)[ids.reshape(-1)][seg.reshape(-1) > 0]
    scale = np.asarray(p["decoder"]["stacks"][0]["layers"]["input_norm"]["scale"][0], np.float64)
    normed = emb / np.sqrt(np.mean(emb ** 2, -1, keepdims=True) + CFG.rms_norm_eps) * scale
    np.testing.assert_allclose(xs[(0, "attn/wq")], normed, rtol=1e-4, atol=1e-5)
    assert xs[(0, "attn/wo")].shape == (13, 64) and xs[(0, "mlp/wo")].shape == (13, 48)
    assert (1, "mlp/shared/wi_gate") in xs and (1, "mlp/wi_gate") not in xs and (0, "mlp/wi_gate") in xs
    assert max(layer for layer, _ in xs) == 3  # the MTP block (if any) is not a decoder layer


def test_weight_bytes_count_codes_and_scales():
    m = create_model(get_preset("tiny"), seed=0)  # H 128, 4 heads of 64, I 384, 4 layers
    stored, bf16 = weight_bytes(quantize_model(m, get_scheme("w8a16")))
    shapes = [(128, 256), (128, 128), (128, 128), (256, 128), (128, 384), (128, 384), (384, 128)]  # [K, N]
    assert bf16 == 4 * sum(2 * k * n for k, n in shapes)
    assert stored == 4 * sum(k * n + 4 * n for k, n in shapes)  # uint8 codes + one fp32 scale per column
    stored2, _ = weight_bytes(quantize_model(m, get_scheme("w2a16")))
    assert stored2 / bf16 <= 0.2  # 2 bits + (scale, zero) fp32 per 64 rows = 3 bits per weight


def test_a_layout_the_weight_cannot_take_names_layer_path_and_shape(model):
    bad = QuantScheme("bad", (WeightRule(("attention",), bits=4, group_size=24),))
    with pytest.raises(ValueError, match=r"layers \[0\] attn/wk \[32, 2, 16\] as \[32, 32\]: group_size=24 must "
                                         r"be positive and divide K=32"):
        quantize_model(model, bad)
