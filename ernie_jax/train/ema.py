"""EMA of the parameters, `ema = a * ema + (1 - a) * params`, evaluated alongside the raw weights.

The decay can be given directly or through an effective decay window W (training doc §3): the EMA keeps
a factor >= 1 - eps of every update older than W steps when a^W <= eps, so `a = eps^(1/W)`
(`W = ln eps / ln a ~ ln(1/eps) / (1 - a)`). E.g. W = 1000, eps = 1/e gives a ~ 0.999.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def decay_from_window(window: float, eps: float = math.exp(-1)) -> float:
    """The EMA decay a with effective window `window` steps at tolerance eps."""
    if window <= 0 or not 0 < eps < 1:
        raise ValueError(f"need window > 0 and 0 < eps < 1, got window={window}, eps={eps}")
    return eps ** (1.0 / window)


def window_from_decay(decay: float, eps: float = math.exp(-1)) -> float:
    return math.log(eps) / math.log(decay)


def ema_update(ema, params, decay: float):
    """Both pytrees of the same structure; the EMA is kept in fp32."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
