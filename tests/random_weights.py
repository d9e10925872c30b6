"""Random test weights drawn on the host. `create_model` compiles an initialiser per config (seconds of XLA
time for a tiny MoE or VL model); a test that only needs some weights draws them with numpy instead."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ErnieConfig
from ernie_jax.model import abstract_model
from ernie_jax.model.router import RouterBias


def random_model(config: ErnieConfig, seed: int = 0, std: float | None = None,
                 correction_biases: bool = True) -> nnx.Module:
    """The model of `config` with every value random: norm scales 1 + N(0, 0.1^2), everything else N(0, std^2)
    (biases included; std: `config.initializer_range` by default). The routers' correction biases are random
    too, or zero (as a new model has them) with `correction_biases=False`."""
    std = config.initializer_range if std is None else std
    r = np.random.RandomState(seed)
    graphdef, state = nnx.split(abstract_model(config))
    flat = []
    for path, v in nnx.to_flat_state(state):
        a = v.get_value()
        noise = r.standard_normal(a.shape)
        if isinstance(v, RouterBias) and not correction_biases:
            noise = np.zeros(a.shape)
        flat.append((path, v.replace(jnp.asarray(1 + 0.1 * noise if path[-1] == "scale" else std * noise, a.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
