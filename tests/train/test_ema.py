import math

import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.train.ema import decay_from_window, ema_update, window_from_decay


def test_window_and_decay_are_inverse():
    a = decay_from_window(1000)
    assert abs(a - 0.999) < 1e-6  # W = 1000 steps at eps = 1/e is the classic 0.999
    assert abs(window_from_decay(a) - 1000) < 1e-6
    a = decay_from_window(100, eps=0.05)
    assert abs(a ** 100 - 0.05) < 1e-9  # updates older than W keep >= 1 - eps of their size
    with pytest.raises(ValueError):
        decay_from_window(0)


def test_ema_update_is_the_recursion():
    ema = {"w": jnp.zeros(3)}
    for t in range(1, 4):
        ema = ema_update(ema, {"w": jnp.full(3, float(t), jnp.bfloat16)}, 0.5)
    assert ema["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ema["w"]), 0.5 * (0.5 * (0.5 * 0 + 0.5 * 1) + 0.5 * 2) + 0.5 * 3)
    assert math.isclose(float(ema["w"][0]), 2.125)


def test_loss_config_takes_a_decay_or_a_window():
    from ernie_jax.train.step import LossConfig
    assert LossConfig(ema_window=1000).ema == pytest.approx(0.999, abs=1e-6)
    assert LossConfig(ema_decay=0.9).ema == 0.9 and LossConfig().ema == 0
    with pytest.raises(ValueError, match="not both"):
        LossConfig(ema_decay=0.9, ema_window=10)
