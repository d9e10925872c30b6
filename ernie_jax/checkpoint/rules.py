"""Rule tables: which transformers key(s) hold each of our parameters, and the transform both ways.

`load_tensors` fills a module's parameters from HF tensors by a rule list and `export_tensors` does the
inverse; `hf.py` (whole models) and `hf_vision.py` (vision encoder / adapter rules) build the lists. torch
`nn.Linear` weights are [out, in]; ours are [in, ..., out] with heads split out. Per-layer tensors stack
along our leading `layers` axis, per-expert tensors along the next one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names the keys and shapes."""


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # transformers key; "{i}" is the decoder layer index
    ours: tuple[Any, ...]  # path in our nnx state
    to_ours: Callable  # one HF tensor -> our tensor (one layer's slice for stacked params)
    to_hf: Callable  # the inverse
    layers: tuple[int, ...] | None = None  # HF layer indices stacked on our leading axis
    experts: int | None = None  # "{e}" in `hf`: experts stacked on the next axis
    keep_fp32: bool = False  # routers stay fp32 whatever the model's dtype (transformers does the same)
    expert_offset: int = 0  # "{e}" counts from here (VL: vision experts follow the text experts on disk)
    row: tuple[int, int] | None = None  # (r, n): this tensor is row r of an HF tensor stacking n (VL biases)

    def keys(self) -> list[str]:
        """The HF keys, in the order the tensors stack (layer-major, then expert)."""
        return [self.hf.format(i=i, e=None if e is None else e + self.expert_offset)
                for i in (self.layers if self.layers is not None else (None,))
                for e in (range(self.experts) if self.experts is not None else (None,))]

    def per_key_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[(self.layers is not None) + (self.experts is not None):]


def identity(x):
    return x


def transpose(x):
    return x.T


def hf_shapes(rules: list[Rule], flat: Mapping) -> dict[str, tuple[int, ...]]:
    """HF key -> the shape the parameters in `flat` (path -> nnx Variable, abstract or not) imply; a row
    rule's key gets the whole stacked tensor's shape. Raises ValueError when `rules` do not cover `flat`."""
    if {r.ours for r in rules} != set(flat):
        raise ValueError(f"rules do not cover the module: {sorted(map(str, {r.ours for r in rules} ^ set(flat)))}")
    out = {}
    for r in rules:
        v = flat[r.ours].get_value()
        shape = tuple(jax.eval_shape(r.to_hf, jax.ShapeDtypeStruct(r.per_key_shape(v.shape), v.dtype)).shape)
        out.update({k: (r.row[1],) + shape if r.row is not None else shape for k in r.keys()})
    return out


def shape_problems(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """One line per missing key and per shape mismatch of `shapes` (HF key -> shape) against `expected`."""
    problems = []
    if missing := sorted(set(expected) - set(shapes)):
        problems.append(f"missing keys ({len(missing)}): {missing}")
    problems += [f"shape mismatch for {k!r}: checkpoint has {tuple(shapes[k])}, the config implies {expected[k]}"
                 for k in sorted(set(expected) & set(shapes)) if tuple(shapes[k]) != expected[k]]
    return problems


def load_tensors(module: nnx.Module, rules: list[Rule], tensors: Mapping[str, np.ndarray], *,
                 shapes: Mapping[str, tuple[int, ...]] | None = None,
                 shardings: Mapping[tuple, jax.sharding.Sharding] | None = None) -> nnx.Module:
    """`module` (abstract or not) with every parameter read from `tensors` (HF key -> array) by `rules`
    (paths relative to `module`) and cast to the parameter's dtype. Checks every key and shape first and
    raises CheckpointError naming them; `shapes` (HF key -> shape) spares reading a lazy `tensors` for
    that. `shardings` (our path -> sharding) places each parameter as it is read."""
    graphdef, state = nnx.split(module)
    flat = dict(nnx.to_flat_state(state))
    problems = shape_problems(hf_shapes(rules, flat),
                              shapes if shapes is not None else {k: np.shape(v) for k, v in tensors.items()})
    if problems:
        raise CheckpointError("\n  ".join(problems))
    new = {}
    for r in rules:
        target = flat[r.ours].get_value()  # shape and dtype
        pick = (lambda a: a) if r.row is None else (lambda a: a[r.row[0]])  # noqa: E731
        arr = np.stack([r.to_ours(pick(np.asarray(tensors[k]))) for k in r.keys()]).reshape(target.shape)
        arr = np.ascontiguousarray(arr.astype(np.dtype(target.dtype)))
        value = jax.device_put(arr, shardings[r.ours]) if shardings is not None else jnp.asarray(arr)
        new[r.ours] = flat[r.ours].replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state([(p, new[p]) for p in flat]))


def export_tensors(module: nnx.Module, rules: list[Rule], *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """HF key -> array of every parameter of `module` by `rules` (paths relative to `module`), cast to
    `dtype` (default: as stored) except the `keep_fp32` ones; row rules fill their rows of one tensor."""
    flat = dict(nnx.to_flat_state(nnx.state(module)))
    out: dict[str, np.ndarray] = {}
    for r in rules:
        value = flat[r.ours].get_value()
        if not isinstance(value, jax.Array):  # a QuantizedWeight: codes + scales have no transformers layout
            raise ValueError(f"parameter {'/'.join(map(str, r.ours))} is quantized ({type(value).__name__}): a "
                             f"quantized model is written with ernie_jax.quantization.checkpoint.save_quantized")
        arr = np.asarray(jax.device_get(value))
        if dtype is not None and not r.keep_fp32:
            arr = arr.astype(jnp.dtype(dtype))
        keys = r.keys()
        for k, a in zip(keys, arr.reshape((len(keys),) + r.per_key_shape(arr.shape))):
            a = np.ascontiguousarray(r.to_hf(a))
            if r.row is None:
                out[k] = a
            else:  # rows of one HF tensor come from several of our tensors
                out.setdefault(k, np.zeros((r.row[1],) + a.shape, a.dtype))[r.row[0]] = a
    return out
