"""Quantized checkpoints: a directory that loads straight into a quantized model.

    save_quantized(qmodel, "runs/tiny/quantized/w4a8", scheme=scheme)
    qmodel = load_quantized("runs/tiny/quantized/w4a8")

Layout: `config.json` (the transformers config of the architecture), `quantization.json` (the scheme, the
stack breaks, the compute dtype and, per quantized tensor, its layout) and `model.safetensors` with our own
parameter paths ("decoder/stacks/1/layers/mlp/experts/wi_up"): a quantized tensor as `<path>/codes` (uint8),
`<path>/scales` and, when asymmetric, `<path>/zeros`; everything else as its array.

Loading builds the model abstractly (`nnx.eval_shape`) and reads each tensor once from the file, so no
full-precision copy of a quantized weight is ever made. Every tensor's presence, shape and dtype is checked
against the config and the recorded layouts before the model is returned; a save writes into a temporary
directory and moves the files into place only when all of them are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ErnieConfig
from ernie_jax.checkpoint.safetensors_io import SafetensorsFile, save_file
from ernie_jax.model.create import abstract_model
from ernie_jax.quantization.model import flatten_params, unflatten_params
from ernie_jax.quantization.quantized_weight import QuantizedWeight
from ernie_jax.quantization.scheme import QuantScheme, WeightRule
from pallas_kernels.qmm import format as qformat

FORMAT = "ernie_jax.quantized/1"
MANIFEST = "quantization.json"
WEIGHTS = "model.safetensors"


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint that does not match its manifest or config; the message names file and tensor."""


def save_quantized(model: nnx.Module, out_dir: str | os.PathLike, *, scheme: QuantScheme,
                   extra: dict | None = None) -> None:
    """Writes a quantized model (`quantize_model`'s output). extra: JSON-able facts kept in the manifest
    (e.g. the source run and step)."""
    config: ErnieConfig = model.config
    out_dir = os.fspath(out_dir)
    tensors, layouts = {}, {}
    for path, v in flatten_params(nnx.to_pure_dict(nnx.state(model))).items():
        if isinstance(v, QuantizedWeight):
            qt = v.qt
            tensors[f"{path}/codes"] = np.asarray(qt.codes)
            tensors[f"{path}/scales"] = np.asarray(qt.scales)
            if qt.zeros is not None:
                tensors[f"{path}/zeros"] = np.asarray(qt.zeros)
            layouts[path] = {"bits": qt.bits, "group_size": qt.group_size, "matrix": list(qt.shape),
                             "symmetric": qt.symmetric, "activation_bits": v.activation_bits,
                             "shape": list(v.shape), "n_in": v.n_in, "n_lead": v.n_lead}
        else:
            tensors[path] = np.asarray(v)
    manifest = {"format": FORMAT, "dtype": config.dtype, "param_dtype": config.param_dtype,
                "layer_stack_breaks": list(config.layer_stack_breaks),
                "scheme": {"name": scheme.name, "method": scheme.method,
                           "rules": [dataclasses.asdict(r) for r in scheme.rules]},
                "tensors": layouts, "extra": extra or {}}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ernie_jax_quantized_", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2, sort_keys=True)
        os.makedirs(out_dir, exist_ok=True)
        for n in os.listdir(tmp):
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a quantized checkpoint directory (QuantizedCheckpointError if it is not one)."""
    f = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.isfile(f):
        raise QuantizedCheckpointError(f"{os.fspath(path)}: no {MANIFEST} (not a quantized checkpoint; "
                                       f"experiments.quantize writes one)")
    with open(f) as fh:
        m = json.load(fh)
    if m.get("format") != FORMAT:
        raise QuantizedCheckpointError(f"{f}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def manifest_scheme(manifest: dict) -> QuantScheme:
    s = manifest["scheme"]
    rules = tuple(WeightRule(**{**r, "targets": tuple(r["targets"]),
                                "layers": None if r["layers"] is None else tuple(r["layers"])}) for r in s["rules"])
    return QuantScheme(s["name"], rules, s["method"])


def load_quantized(path: str | os.PathLike, *, dtype: str | None = None) -> nnx.Module:
    """The quantized model of a `save_quantized` directory. dtype: compute dtype (default: the saved one)."""
    path = os.fspath(path)
    m = read_manifest(path)
    config = ErnieConfig.from_hf(path, dtype=dtype or m["dtype"], param_dtype=m["param_dtype"],
                                 layer_stack_breaks=tuple(m["layer_stack_breaks"]))
    graphdef, abstract = nnx.split(abstract_model(config))
    expected = flatten_params(nnx.to_pure_dict(abstract))
    fname = os.path.join(path, WEIGHTS)
    f = SafetensorsFile(fname)
    layouts = m["tensors"]
    unknown = sorted(set(layouts) - set(expected))
    if unknown:
        raise QuantizedCheckpointError(f"{os.path.join(path, MANIFEST)}: quantized tensors {unknown[:5]} are not "
                                       f"parameters of this model ({len(unknown)} in all)")
    want_keys = set()
    for p in expected:
        want_keys |= ({f"{p}/codes", f"{p}/scales"} | ({f"{p}/zeros"} if not layouts[p]["symmetric"] else set())
                      if p in layouts else {p})
    have = set(f.keys())
    if want_keys != have:
        missing, extra = sorted(want_keys - have), sorted(have - want_keys)
        raise QuantizedCheckpointError(f"{fname}: tensors do not match the model and {MANIFEST}: missing "
                                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                                       f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    flat = {}
    for p, abs_v in expected.items():
        if p not in layouts:
            if f.shape(p) != tuple(abs_v.shape):
                raise QuantizedCheckpointError(f"{fname}: tensor {p!r} has shape {f.shape(p)}, the model expects "
                                               f"{tuple(abs_v.shape)}")
            flat[p] = jnp.asarray(f.get(p), abs_v.dtype)
            continue
        lay = layouts[p]
        shape = tuple(lay["shape"])
        stack = tuple(abs_v.shape[:len(abs_v.shape) - len(shape)])
        if tuple(abs_v.shape[len(stack):]) != shape:
            raise QuantizedCheckpointError(f"{os.path.join(path, MANIFEST)}: {p!r} is recorded as a {list(shape)} "
                                           f"weight, the model's is {list(abs_v.shape)}")
        qt = qformat.QuantizedTensor(
            codes=jnp.asarray(f.get(f"{p}/codes")), scales=jnp.asarray(f.get(f"{p}/scales")),
            zeros=None if lay["symmetric"] else jnp.asarray(f.get(f"{p}/zeros")), bits=lay["bits"],
            group_size=lay["group_size"], shape=tuple(lay["matrix"]))
        k = int(np.prod(shape[lay["n_lead"]:lay["n_lead"] + lay["n_in"]]))
        if tuple(lay["matrix"]) != (k, int(np.prod(shape)) // k // int(np.prod(shape[:lay["n_lead"]]))):
            raise QuantizedCheckpointError(f"{os.path.join(path, MANIFEST)}: {p!r}: matrix {lay['matrix']} is not "
                                           f"the [K, N] view of {list(shape)}")
        try:
            qformat.check_tensor(qt, name=f"{fname}: {p}", lead=stack + shape[:lay["n_lead"]])
        except ValueError as e:
            raise QuantizedCheckpointError(str(e)) from None
        flat[p] = QuantizedWeight(qt=qt, shape=shape, n_in=lay["n_in"], n_lead=lay["n_lead"],
                                  activation_bits=lay["activation_bits"])
    nnx.replace_by_pure_dict(abstract, unflatten_params(flat))
    return nnx.merge(graphdef, abstract)
