"""`grouped_matmul`'s choice of implementation: `ragged_dot` and `pallas` (library calls, here against the
per-group loop), `auto`, and unknown names."""

import jax
import pytest
from grouped_matmul_oracle import CASES, check_against_oracle, check_bf16, inputs

from ernie_jax.model.grouped_matmul import grouped_matmul


@pytest.mark.parametrize("case", CASES)
def test_ragged_dot_matches_per_group_loop(case):
    sizes, m, tile = CASES[case]
    check_against_oracle("ragged_dot", sizes, m, tile)


@pytest.mark.parametrize("case", ["empty_groups", "trailing_rows_zero"])
def test_pallas_matches_per_group_loop(case):
    """The Pallas kernel with its default target: the interpreter on this CPU host."""
    sizes, m, _ = CASES[case]
    check_against_oracle("pallas", sizes, m)


@pytest.mark.parametrize("impl", ["ragged_dot", "pallas"])
def test_bf16_inputs_within_bf16_tolerance(impl):
    check_bf16(impl)


@pytest.mark.parametrize("case", ["empty_groups", "trailing_rows_zero"])
def test_auto_matches_per_group_loop(case):
    sizes, m, _ = CASES[case]
    check_against_oracle("auto", sizes, m)


def test_auto_lowers_bucketed_for_cpu():
    """`auto` is decided when lowering: `bucketed` (a custom VJP, no ragged_dot) for this CPU; the TPU side
    (`ragged_dot` when lowering for a TPU topology) is checked in tests/tpu_aot/test_train_step_aot.py."""
    if jax.default_backend() == "tpu":
        pytest.skip("lowers ragged_dot on TPU")
    lhs, rhs, gs, _ = inputs([16, 16, 16, 16], 64)
    text = jax.jit(lambda a: grouped_matmul(a, rhs, gs)).lower(lhs).as_text()
    assert "ragged_dot" not in text
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda a: grouped_matmul(a, rhs, gs))(lhs))


def test_unknown_impl_is_an_error():
    lhs, rhs, gs, _ = inputs([2, 2], 4)
    with pytest.raises(ValueError, match="unknown grouped-matmul impl 'nope'"):
        grouped_matmul(lhs, rhs, gs, impl="nope")
