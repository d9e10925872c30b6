"""The `tiled` grouped matmul against the per-group loop: it re-tiles the sorted rows per group with index
arithmetic, where off-by-one errors hide (empty groups, groups shorter than a tile, M not a multiple of the
tile, rows past the groups)."""

import pytest
from grouped_matmul_oracle import CASES, check_against_oracle, check_bf16

from ernie_jax.model.grouped_matmul.tiled import default_tile


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_per_group_loop(case):
    sizes, m, tile = CASES[case]
    check_against_oracle("tiled", sizes, m, tile)


def test_bf16_inputs_within_bf16_tolerance():
    check_bf16("tiled")


def test_default_tile_heuristic():
    """The average group size rounded down to a power of two, clamped to [8, 512]."""
    assert default_tile(64, 8) == 8
    assert default_tile(1000, 4) == 128  # 250 -> 128
    assert default_tile(100, 64) == 8  # below the floor
    assert default_tile(10, 64) == 8  # M < G
    assert default_tile(1 << 20, 2) == 512  # the ceiling
