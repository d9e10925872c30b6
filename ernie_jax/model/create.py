"""Building a model: abstractly (shapes only), on one device, or directly sharded on a mesh.

On a mesh the initialiser runs under `jax.jit` with the parameters' out_shardings, so no device ever
holds the full model (the MaxText pattern).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh

from ernie_jax.config import ErnieConfig
from ernie_jax.model.lm import ErnieForCausalLM
from ernie_jax.sharding import param_shardings, resolve_rules
from ernie_jax.sharding.rules import Rules


def model_class(config: ErnieConfig) -> type[nnx.Module]:
    if config.vision is not None:
        raise NotImplementedError("the VL model is built by the multimodal issue (#8)")
    return ErnieForCausalLM


def abstract_model(config: ErnieConfig, seed: int = 0) -> nnx.Module:
    """The model with `ShapeDtypeStruct`s instead of arrays: no memory, any size."""
    cls = model_class(config)
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed)))


def count_params(config: ErnieConfig) -> int:
    """Number of parameters (every `nnx.Param` element), computed abstractly."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def create_model(config: ErnieConfig, *, seed: int = 0, mesh: Mesh | None = None,
                 rules: Rules | str | None = None) -> nnx.Module:
    """A randomly initialised model (transformers' init: N(0, initializer_range), norms 1, biases 0).

    With `mesh`, parameters are created sharded by `rules` (a preset name, a table, or a MeshConfig).
    """
    cls = model_class(config)

    def init():
        return nnx.split(cls(config, rngs=nnx.Rngs(seed)))[1]

    graphdef, abstract_state = nnx.split(abstract_model(config, seed))
    out_shardings = None
    if mesh is not None:
        out_shardings = param_shardings(abstract_state, mesh, resolve_rules(rules or "fsdp"))
    state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)
