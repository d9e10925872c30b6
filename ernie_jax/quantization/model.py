"""`quantize_model`: a model's decoder projections stored as integer codes by a `QuantScheme`.

    qmodel = quantize_model(model, get_scheme("w4a8"))            # round to nearest
    hs = layer_hessians(model, batches)                            # ernie_jax.quantization.calibration
    qmodel = quantize_model(model, get_scheme("w2a16", method="gptq"), hessians=hs)

Each quantized projection's `nnx.Param` then holds a `QuantizedWeight` (`quantized_weight.py`) instead of an
array; embeddings, norms, routers, the head and the MTP block stay as they are (`scheme.py`).

A scheme whose layout changes inside a run of same-kind layers (WINT2) splits the scanned stack there
(`ErnieConfig.layer_stack_breaks`): a stacked parameter holds one layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ErnieConfig
from ernie_jax.model.create import abstract_model
from ernie_jax.model.decoder import layer_segments
from ernie_jax.quantization.quantized_weight import QuantizedWeight
from ernie_jax.quantization.scheme import Layout, QuantScheme
from pallas_kernels.qmm import format as qformat

EXPERT_PREFIX = "mlp/experts/"


# --- which weights, and how -----------------------------------------------------------------------------------


def matrix_view(rel_path: str, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(n_lead, n_in, K, N) of a per-layer weight at `rel_path` ("attn/wo", "mlp/experts/wi_up", ...)."""
    n_lead = 1 if rel_path.startswith(EXPERT_PREFIX) else 0
    n_in = 2 if rel_path == "attn/wo" else 1
    k = int(np.prod(shape[n_lead:n_lead + n_in]))
    n = int(np.prod(shape[n_lead + n_in:]))
    return n_lead, n_in, k, n


def group_size(layout: Layout, k: int) -> int:
    """The layout's group along K for a weight with K rows: per column when None or at least K."""
    return k if layout.group_size is None or layout.group_size >= k else layout.group_size


@functools.partial(jax.jit, static_argnames=("bits", "group", "symmetric", "n_vmap"))
def _rtn(mats: jax.Array, *, bits: int, group: int, symmetric: bool, n_vmap: int) -> qformat.QuantizedTensor:
    fn: Callable = lambda m: qformat.quantize(m, bits, group, symmetric=symmetric)
    for _ in range(n_vmap):
        fn = jax.vmap(fn)
    return fn(mats)


def quantize_weight(w: jax.Array, rel_path: str, layout: Layout, *, name: str, n_stack: int = 0,
                    hessian: np.ndarray | None = None) -> QuantizedWeight:
    """A weight [*stack, *shape] (`n_stack` leading layer axes) -> QuantizedWeight: round to nearest, or GPTQ
    given the Hessian [K, K] of its inputs (one layer's matrix: no stack, not the experts)."""
    from ernie_jax.quantization.gptq import gptq

    stack, shape = tuple(w.shape[:n_stack]), tuple(w.shape[n_stack:])
    n_lead, n_in, k, n = matrix_view(rel_path, shape)
    g = group_size(layout, k)
    qformat.check_layout(k, n, layout.bits, g, name=f"{name} {list(shape)} as")
    mats = jnp.asarray(w, jnp.float32).reshape(stack + shape[:n_lead] + (k, n))
    if hessian is not None:
        if n_lead or n_stack:
            raise ValueError(f"{name}: GPTQ takes one [K, N] matrix, got a stack {list(stack + shape[:n_lead])}")
        qt = gptq(np.asarray(mats), hessian, layout.bits, g, symmetric=layout.symmetric, name=name)
    else:
        qt = _rtn(mats, bits=layout.bits, group=g, symmetric=layout.symmetric, n_vmap=n_stack + n_lead)
    return QuantizedWeight(qt=qt, shape=shape, n_in=n_in, n_lead=n_lead, activation_bits=layout.activation_bits)


def layer_slots(config: ErnieConfig) -> list[tuple[int, int]]:
    """Layer i -> (stack index, position in the stack) of `config`'s scanned stacks."""
    slots = []
    for s, (_, n) in enumerate(layer_segments(config)):
        slots += [(s, j) for j in range(n)]
    return slots


def flatten_params(tree: dict, prefix: str = "") -> dict[str, object]:
    """A pure-dict state -> {"/"-joined path: leaf} (a QuantizedWeight is one leaf)."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten_params(flat: dict[str, object]) -> dict:
    """The inverse of `flatten_params` (digit path parts become the int keys of nnx lists)."""
    root: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = root
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = v
    return root


def quantize_model(model: nnx.Module, scheme: QuantScheme, *,
                   hessians: dict[tuple[int, str], np.ndarray] | None = None,
                   progress: Callable[[str], None] | None = None) -> nnx.Module:
    """A copy of `model` whose decoder projections are stored as the scheme says (the input is untouched).

    hessians: {(layer, rel_path): H [K, K]} of the projections' inputs (`calibration.layer_hessians`), needed
    when scheme.method is "gptq"; weights without one (the routed experts) are rounded to nearest."""
    config: ErnieConfig = model.config
    layouts = scheme.layouts(config)
    if scheme.method == "gptq" and not hessians:
        raise ValueError(f"scheme {scheme.name!r} uses GPTQ: pass the calibration hessians "
                         f"(ernie_jax.quantization.calibration.layer_hessians)")
    breaks = tuple(sorted(set(config.layer_stack_breaks) | set(scheme.stack_breaks(config))))
    qconfig = dataclasses.replace(config, layer_stack_breaks=breaks)
    old = flatten_params(nnx.to_pure_dict(nnx.state(model)))
    done = [p for p, v in old.items() if isinstance(v, QuantizedWeight)]
    if done:
        raise ValueError(f"quantize_model: the model is already quantized ({done[0]} holds a QuantizedWeight); "
                         f"quantize the full-precision model")
    target = abstract_model(qconfig)
    graphdef, abstract = nnx.split(target)
    old_slots, new_slots = layer_slots(config), layer_slots(qconfig)
    new_members: dict[int, list[int]] = {}
    for i, (s, _) in enumerate(new_slots):
        new_members.setdefault(s, []).append(i)

    def layer_value(i: int, rel: str):
        s, j = old_slots[i]
        return old[f"decoder/stacks/{s}/layers/{rel}"][j]

    flat = {}
    for path in flatten_params(nnx.to_pure_dict(abstract)):
        if not path.startswith("decoder/stacks/"):
            flat[path] = old[path]
            continue
        _, _, s, _, rel = path.split("/", 4)
        members = new_members[int(s)]
        lays = {layouts.get((rel, i)) for i in members}
        if len(lays) != 1:  # stack_breaks split every stack where a layout changes
            raise AssertionError(f"{path}: layers {members} mix layouts {lays}")
        lay = lays.pop()
        if lay is None:
            flat[path] = jnp.stack([layer_value(i, rel) for i in members])
            continue
        stacked = jnp.stack([layer_value(i, rel) for i in members])
        gptq = scheme.method == "gptq" and hessians is not None and all((i, rel) in hessians for i in members)
        if progress is not None:
            progress(f"layers {members[0]}-{members[-1]} {rel}: {lay.name()}{' gptq' if gptq else ''}")
        if not gptq:  # round to nearest: the whole stack at once
            flat[path] = quantize_weight(stacked, rel, lay, n_stack=1, name=f"layers {members} {rel}")
            continue
        per_layer = [quantize_weight(layer_value(i, rel), rel, lay, name=f"layer {i} {rel}", hessian=hessians[(i, rel)])
                     for i in members]
        flat[path] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    nnx.replace_by_pure_dict(abstract, unflatten_params(flat))
    return nnx.merge(graphdef, abstract)


def weight_bytes(model: nnx.Module) -> tuple[int, int]:
    """(bytes of the decoder projections: the quantized ones' codes + scales (+ zeros), the others at 2 bytes a
    value; bytes of all of them in bf16). Embeddings, norms, routers and the MTP block are not counted."""
    stored = bf16 = 0
    for path, v in flatten_params(nnx.to_pure_dict(nnx.state(model))).items():
        if not path.startswith("decoder/stacks/") or path.split("/", 4)[-1].split("/")[0] not in ("attn", "mlp"):
            continue
        if path.endswith("router/kernel") or "/router/" in path:
            continue
        if isinstance(v, QuantizedWeight):
            stored += v.qt.nbytes
            bf16 += 2 * int(np.prod(v.qt.codes.shape[:-2])) * v.qt.shape[0] * v.qt.shape[1]
        else:
            stored += 2 * int(np.prod(np.shape(v)))
            bf16 += 2 * int(np.prod(np.shape(v)))
    return stored, bf16
