"""WSD learning-rate schedule: linear warmup, a stable plateau, then a decay to `min_lr`.

As Baidu's `wsd_lr.py` (following MiniCPM): the decay covers the last `decay_steps` of `total_steps` and is
`1-sqrt` (lr = min + (peak - min) * (1 - sqrt(p))) or `linear` (1 - p), p the fraction of decay done.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

DECAYS = ("1-sqrt", "linear")


def wsd_schedule(peak_lr: float, total_steps: int, *, warmup_steps: int, decay_steps: int,
                 min_lr: float = 0.0, decay: str = "1-sqrt") -> optax.Schedule:
    """lr(step) for steps 0..total_steps-1 (step = the number of updates done before this one)."""
    if decay not in DECAYS:
        raise ValueError(f"unknown WSD decay {decay!r}; known: {DECAYS}")
    if warmup_steps < 0 or decay_steps < 0 or warmup_steps + decay_steps > total_steps:
        raise ValueError(f"WSD needs 0 <= warmup_steps ({warmup_steps}) + decay_steps ({decay_steps}) "
                         f"<= total_steps ({total_steps})")
    decay_start = total_steps - decay_steps

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1) / max(warmup_steps, 1)
        p = jnp.clip((step - decay_start + 1) / max(decay_steps, 1), 0.0, 1.0)
        shape = 1.0 - jnp.sqrt(p) if decay == "1-sqrt" else 1.0 - p
        decayed = min_lr + (peak_lr - min_lr) * shape
        return jnp.where(step < warmup_steps, warm, jnp.where(step >= decay_start, decayed, peak_lr))

    return lr
