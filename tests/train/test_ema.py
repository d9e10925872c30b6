import math

import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.train.ema import EMAConfig, decay_from_window, ema_update


def test_decay_from_window_forgets_eps_after_the_window():
    a = decay_from_window(1000)
    assert abs(a - 0.999) < 1e-6  # W = 1000 steps at eps = 1/e is the classic 0.999
    assert abs(a ** 1000 - math.exp(-1)) < 1e-9
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


def test_ema_config_takes_a_decay_or_a_window():
    assert EMAConfig(window=1000).effective_decay == pytest.approx(0.999, abs=1e-6)
    assert EMAConfig(window=10, eps=0.5).effective_decay == pytest.approx(0.5 ** 0.1)
    assert EMAConfig(decay=0.9).effective_decay == 0.9 and EMAConfig(decay=0.9).enabled
    assert EMAConfig().effective_decay == 0 and not EMAConfig().enabled  # the default: no EMA
    with pytest.raises(ValueError, match="not both"):
        EMAConfig(decay=0.9, window=10)
    for bad, match in [(dict(decay=1.0), r"decay must be in \[0, 1\)"), (dict(window=-1.0), "window must be >= 0"),
                       (dict(window=10, eps=1.0), r"eps must be in \(0, 1\)")]:
        with pytest.raises(ValueError, match=match):
            EMAConfig(**bad)


def test_the_loss_config_has_no_ema():
    """EMA is its own section (`config.ema`), not a loss term."""
    import dataclasses

    from ernie_jax.train.step import LossConfig
    assert not [f.name for f in dataclasses.fields(LossConfig) if "ema" in f.name]
