"""Quantization schemes (ernie_jax/quantization/scheme.py): which weight of which layer gets which layout, where
the stacks split, and the errors of a scheme that cannot apply."""

import pytest

from ernie_jax.presets import get_preset
from ernie_jax.quantization.scheme import PRESETS, Layout, QuantScheme, SchemeError, WeightRule, get_scheme

MOE = get_preset("tiny-moe-test", num_hidden_layers=4)  # layer 0 dense, 1-3 MoE with a shared expert
DENSE = get_preset("tiny-test")


def test_w4a8_experts_int4_the_rest_int8_all_with_int8_activations():
    lay = get_scheme("w4a8").layouts(MOE)
    assert lay[("mlp/experts/wi_up", 2)] == Layout(4, None, True, 8)
    assert lay[("mlp/wo", 0)] == Layout(4, None, True, 8)  # the dense layer's MLP stands in for experts
    assert lay[("attn/wo", 3)] == lay[("mlp/shared/wi_gate", 1)] == Layout(8, None, True, 8)
    assert ("mlp/router/kernel", 1) not in lay and ("mlp/wo", 1) not in lay  # no dense MLP in an MoE layer
    # every projection of every layer has a layout: 4 attention + 3 MLP (dense) or 3 + 3 (MoE)
    assert len(lay) == 4 * 4 + 3 + 3 * 6


def test_wint2_layout_and_where_the_stack_splits():
    s = get_scheme("wint2", wint2_int4_layers=2)
    lay = s.layouts(MOE)
    assert lay[("mlp/experts/wo", 1)] == Layout(4)  # int4 per channel below the boundary
    assert lay[("mlp/experts/wo", 2)] == lay[("mlp/experts/wi_gate", 3)] == Layout(2, 64, False)
    assert lay[("attn/wq", 2)] == lay[("mlp/shared/wo", 3)] == lay[("mlp/wi_up", 0)] == Layout(8)
    assert s.stack_breaks(MOE) == (2,)
    # the released layout on the 21B shape: experts of layers 1-6 int4 (layer 0 is dense), 7-27 2-bit
    big = get_preset("ernie-4.5-21b-a3b")
    assert get_scheme("wint2").stack_breaks(big) == (7,)
    assert get_scheme("w4a8").stack_breaks(big) == ()


def test_first_matching_rule_wins_and_unmatched_weights_stay():
    s = QuantScheme("mine", (WeightRule(("attention",), bits=2, group_size=16, layers=(1, 2)),
                             WeightRule(("attention",), bits=8)))
    lay = s.layouts(DENSE)
    assert lay[("attn/wq", 1)].bits == 2 and lay[("attn/wq", 0)].bits == 8
    assert not any(w.startswith("mlp") for w, _ in lay)
    assert s.stack_breaks(DENSE) == (1,)


@pytest.mark.parametrize("make, match", [
    (lambda: QuantScheme("x", (WeightRule(("attention",), bits=8, layers=(0, 9)),)).check(DENSE),
     r"rule 0: layers \[0, 9\] reach past the model's 2 decoder layers"),
    (lambda: QuantScheme("x", (WeightRule(("experts",), bits=4),)).check(DENSE), r"targets \['experts'\]: the model "
                                                                                   "has none"),
    (lambda: QuantScheme("x", (WeightRule(("attn",), bits=4),)), r"targets \['attn'\] must be"),
    (lambda: QuantScheme("x", (WeightRule(("mlp",), bits=3),)), "bits=3 is not supported"),
    (lambda: QuantScheme("x", (WeightRule(("mlp",), bits=2, group_size=6),)), "group_size=6 must be"),
    (lambda: QuantScheme("x", (WeightRule(("mlp",), bits=8, activation_bits=4),)), "activation_bits=4"),
    (lambda: QuantScheme("x", (WeightRule(("mlp",), bits=8),), method="awq"), "method='awq'"),
    (lambda: get_scheme("w3a16"), "unknown quantization scheme 'w3a16'"),
    (lambda: get_scheme("w4a8", wint2_int4_layers=2), "applies to the 'wint2' scheme"),
])
def test_bad_schemes_name_the_rule_and_value(make, match):
    with pytest.raises(SchemeError, match=match):
        make()


def test_presets_apply_to_dense_and_moe_models():
    for name, s in PRESETS.items():
        if name == "wint2":  # experts rules (a MoE model), int4 up to layer 7 (a deeper one, or a new boundary)
            with pytest.raises(SchemeError, match="reach past the model's 4 decoder layers"):
                s.check(MOE)
            with pytest.raises(SchemeError, match="the model has none"):
                get_scheme(name, wint2_int4_layers=1).check(DENSE)
            assert get_scheme(name, wint2_int4_layers=2).layouts(MOE)
            continue
        assert s.layouts(DENSE) and s.layouts(MOE), name
