import numpy as np
import pytest

from ernie_jax.train.schedule import wsd_schedule


def test_wsd_shape():
    f = wsd_schedule(1.0, 100, warmup_steps=10, decay_steps=40, min_lr=0.1, decay="1-sqrt")
    lr = np.array([float(f(s)) for s in range(100)])
    np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10)  # linear warmup reaching the peak
    assert np.all(lr[10:60] == 1.0)  # stable
    p = (np.arange(60, 100) - 60 + 1) / 40
    np.testing.assert_allclose(lr[60:], 0.1 + 0.9 * (1 - np.sqrt(p)), rtol=1e-6)
    assert abs(lr[-1] - 0.1) < 1e-6
    lin = wsd_schedule(1.0, 100, warmup_steps=0, decay_steps=50, decay="linear")
    np.testing.assert_allclose(float(lin(74)), 1 - 25 / 50, rtol=1e-6)


def test_wsd_errors():
    with pytest.raises(ValueError, match="decay"):
        wsd_schedule(1.0, 10, warmup_steps=1, decay_steps=1, decay="cosine")
    with pytest.raises(ValueError, match="<= total_steps"):
        wsd_schedule(1.0, 10, warmup_steps=6, decay_steps=6)
