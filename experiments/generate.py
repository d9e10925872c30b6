"""Main job until the trainer lands: build (or load) a model, run a sharded forward, continue prompts greedily.

    python -m experiments.generate                          # tiny random model on all local devices
    python -m experiments.generate --hf_dir=/path/to/ERNIE-4.5-0.3B-PT --prompt_ids=1,2,3

The trainer issue replaces this with `experiments/train.py` (training the tiny default on the bundled
synthetic data); until then a randomly initialised model produces arbitrary tokens, which is expected.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

import ernie_jax
from ernie_jax.inference.greedy import greedy_steps
from ernie_jax.model import create_model
from ernie_jax.sharding import MeshConfig, activate, logical_to_spec, make_mesh, resolve_rules, sharding_table

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset (ignored with --hf_dir)")
_HF_DIR = flags.DEFINE_string("hf_dir", "", "a transformers ERNIE-4.5 directory to load instead of a preset")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and parameter dtype")
_RULES = flags.DEFINE_string("rules", "fsdp", "sharding rules preset")
_BATCH = flags.DEFINE_integer("batch", 2, "number of prompts")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 8, "random prompt length (ignored with --prompt_ids)")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", "", "comma-separated token ids of one prompt")
_NEW = flags.DEFINE_integer("max_new_tokens", 24, "tokens to generate")
_SEED = flags.DEFINE_integer("seed", 0, "init and prompt seed")


def main(argv):
    del argv
    print("ernie-jax main job: no trainer yet (it lands with the trainer issue). This builds a model, runs a "
          "sharded forward and continues prompts greedily. A random model's continuations are arbitrary.")
    mesh_cfg = MeshConfig(fsdp=-1, rules=_RULES.value)
    mesh = make_mesh(mesh_cfg)
    rules = resolve_rules(mesh_cfg)
    if _HF_DIR.value:
        model = ernie_jax.from_pretrained(_HF_DIR.value, dtype=_DTYPE.value, mesh=mesh, rules=rules)
    else:
        cfg = ernie_jax.get_preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value)
        model = create_model(cfg, seed=_SEED.value, mesh=mesh, rules=rules)
    cfg = model.config
    logging.info("config: %s", cfg)
    logging.info("parameters (%s) on mesh %s:\n%s", f"{ernie_jax.count_params(cfg):,}", dict(mesh.shape),
                 sharding_table(nnx.state(model, nnx.Param), mesh, rules))

    rng = np.random.RandomState(_SEED.value)
    if _PROMPT_IDS.value:
        prompt = np.asarray([[int(t) for t in _PROMPT_IDS.value.split(",")]] * _BATCH.value, np.int32)
    else:
        prompt = rng.randint(3, cfg.vocab_size, (_BATCH.value, _PROMPT_LEN.value)).astype(np.int32)
    if prompt.max() >= cfg.vocab_size:
        raise app.UsageError(f"--prompt_ids has id {prompt.max()} >= vocab_size {cfg.vocab_size}")

    with activate(mesh, rules):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids).logits)
        ids = jax.device_put(jnp.asarray(prompt), jax.sharding.NamedSharding(mesh, logical_to_spec(
            ("act_batch", "act_length"), prompt.shape, dict(mesh.shape), rules)))
        t0 = time.perf_counter()
        logits = jax.block_until_ready(forward(state, ids))
        t1 = time.perf_counter()
        jax.block_until_ready(forward(state, ids))
        t2 = time.perf_counter()
        print(f"forward {tuple(prompt.shape)} -> logits {tuple(logits.shape)}: compile+run {t1 - t0:.2f} s, "
              f"run {1e3 * (t2 - t1):.1f} ms; finite: {bool(jnp.isfinite(logits).all())}")
        tokens = jnp.asarray(prompt)
        for tokens in tqdm(greedy_steps(model, tokens, _NEW.value), total=_NEW.value, desc="greedy decoding",
                           unit="tok"):
            pass
    out = np.asarray(tokens)
    for i, row in enumerate(out):
        p = prompt.shape[1]
        print(f"[{i}] prompt {row[:p].tolist()} -> continuation {row[p:].tolist()}")


if __name__ == "__main__":
    app.run(main)
