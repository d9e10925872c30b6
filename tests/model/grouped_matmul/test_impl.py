"""`grouped_matmul`'s choice of implementation: `ragged_dot` and `pallas` (library calls, here against the
per-group loop), `auto`, and unknown names."""

import jax
import pytest
from grouped_matmul_oracle import CASES, check_against_oracle, check_bf16, inputs

from ernie_jax.model.grouped_matmul import grouped_matmul
from ernie_jax.model.grouped_matmul.impl import resolve_impl


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


def test_auto_is_bucketed_off_tpu():
    if jax.default_backend() == "tpu":
        pytest.skip("auto picks ragged_dot on TPU")
    assert resolve_impl("auto") == "bucketed" and resolve_impl("tiled") == "tiled"
    lhs, rhs, gs, _ = inputs([16, 16, 16, 16], 64)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda a: grouped_matmul(a, rhs, gs))(lhs))


def test_unknown_impl_is_an_error():
    lhs, rhs, gs, _ = inputs([2, 2], 4)
    with pytest.raises(ValueError, match="unknown grouped-matmul impl 'nope'"):
        grouped_matmul(lhs, rhs, gs, impl="nope")
