"""EMA of the parameters, `ema = a * ema + (1 - a) * params`, evaluated alongside the raw weights.

The decay can be given directly or through an effective decay window W (training doc §3): the EMA keeps
a factor >= 1 - eps of every update older than W steps when a^W <= eps, so `a = eps^(1/W)`
(`W = ln eps / ln a ~ ln(1/eps) / (1 - a)`). E.g. W = 1000, eps = 1/e gives a ~ 0.999.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class EMAConfig:
    """The EMA of a run (experiment config section `ema`): `decay`, or the window `window` in steps with
    tolerance `eps` (decay = eps ** (1 / window)); neither set: no EMA."""

    decay: float = 0.0
    window: float = 0.0
    eps: float = math.exp(-1)

    def __post_init__(self):
        if self.decay and self.window:
            raise ValueError(f"EMAConfig: set decay or window, not both (got decay={self.decay}, "
                             f"window={self.window})")
        if not 0 <= self.decay < 1:
            raise ValueError(f"EMAConfig.decay must be in [0, 1), got {self.decay}")
        if self.window < 0:
            raise ValueError(f"EMAConfig.window must be >= 0 (0: use decay), got {self.window}")
        if not 0 < self.eps < 1:
            raise ValueError(f"EMAConfig.eps must be in (0, 1), got {self.eps}")

    @property
    def effective_decay(self) -> float:
        """The decay in effect (0: no EMA)."""
        return decay_from_window(self.window, self.eps) if self.window else self.decay

    @property
    def enabled(self) -> bool:
        return self.effective_decay > 0


def decay_from_window(window: float, eps: float = math.exp(-1)) -> float:
    """The EMA decay a with effective window `window` steps at tolerance eps."""
    if window <= 0 or not 0 < eps < 1:
        raise ValueError(f"need window > 0 and 0 < eps < 1, got window={window}, eps={eps}")
    return eps ** (1.0 / window)


def ema_update(ema, params, decay: float):
    """Both pytrees of the same structure; the EMA is kept in fp32."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
