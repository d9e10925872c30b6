"""Building a model: abstractly (shapes only), on one device, or directly sharded on a mesh.

On a mesh the initialiser runs under `jax.jit` with the parameters' out_shardings, so no device ever
holds the full model (the MaxText pattern).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from ernie_jax.config import ErnieConfig
from ernie_jax.model.lm import ErnieForCausalLM
from ernie_jax.sharding import param_shardings, resolve_rules
from ernie_jax.sharding.rules import Rules


def model_class(config: ErnieConfig) -> type[nnx.Module]:
    if config.vision is not None:
        from ernie_jax.model.vl import ErnieVLForConditionalGeneration  # the ViT and adapter only for VL
        return ErnieVLForConditionalGeneration
    return ErnieForCausalLM


def _build(config: ErnieConfig, seed) -> nnx.Module:
    # RBG keys: the initialiser (many random tensors) compiles much faster than with threefry; the values
    # depend on the backend's RngBitGenerator, so the same seed gives other weights on CPU and TPU.
    return model_class(config)(config, rngs=nnx.Rngs(params=jax.random.key(seed, impl="rbg")))


def abstract_model(config: ErnieConfig) -> nnx.Module:
    """The model with `ShapeDtypeStruct`s instead of arrays: no memory, any size."""
    return nnx.eval_shape(lambda: _build(config, 0))


def count_params(config: ErnieConfig) -> int:
    """Number of parameters, computed abstractly. Like transformers' count it includes the routers'
    correction biases (not trained by gradients); unlike it, the MTP block when the config has one."""
    state = nnx.state(abstract_model(config))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def create_model(config: ErnieConfig, *, seed: int = 0, mesh: Mesh | None = None,
                 rules: Rules | str | None = None) -> nnx.Module:
    """A randomly initialised model (transformers' init: N(0, initializer_range), norms 1, biases 0).

    With `mesh`, parameters are created sharded by `rules` (a preset name, a table, or a MeshConfig).
    """
    graphdef = nnx.graphdef(abstract_model(config))
    rule_items = None if mesh is None else tuple(sorted(resolve_rules(rules or "fsdp").items()))
    return nnx.merge(graphdef, _jitted_init(config, mesh, rule_items)(seed))


@functools.lru_cache(maxsize=32)
def _jitted_init(config: ErnieConfig, mesh: Mesh | None, rule_items: tuple | None) -> Callable:
    """One compiled initialiser per (config, mesh, rules); the seed is a runtime argument."""
    out_shardings = None
    if mesh is not None:
        out_shardings = param_shardings(nnx.state(abstract_model(config)), mesh, dict(rule_items))
    return jax.jit(lambda seed: nnx.split(_build(config, seed))[1], out_shardings=out_shardings)
