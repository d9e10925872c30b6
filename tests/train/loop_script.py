"""A tiny training run for the loop tests (run as a subprocess so it can be killed)."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("ERNIE_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import numpy as np  # noqa: E402

import ernie_jax  # noqa: E402
from ernie_jax.sharding import MeshConfig  # noqa: E402
from ernie_jax.train.ema import EMAConfig  # noqa: E402
from ernie_jax.train.loop import TrainConfig, train  # noqa: E402
from ernie_jax.train.optimizer import OptimizerConfig  # noqa: E402
from ernie_jax.train.step import LossConfig  # noqa: E402


class CountingData:
    """Deterministic batches: batch i is a function of i alone; the state is i."""

    def __init__(self, batch=8, seq=16, vocab=128):
        self.i, self.batch, self.seq, self.vocab = 0, batch, seq, vocab

    def __next__(self):
        r = np.random.RandomState(self.i)
        self.i += 1
        start = r.randint(3, 20, (self.batch, 1))
        tok = (start + np.arange(self.seq + 1)) % (self.vocab - 3) + 3  # counting sequences: learnable
        return {"tokens": tok[:, :-1].astype(np.int32), "targets": tok[:, 1:].astype(np.int32),
                "loss_mask": np.ones((self.batch, self.seq), np.int32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def config(total_steps, checkpoint_every):
    # ragged_dot: the quickest grouped matmul to trace and compile on CPU (each backend has its own tests)
    model = ernie_jax.get_preset("tiny-moe-test", num_hidden_layers=2, moe_layer_start_index=1,
                                 moe_gmm_impl="ragged_dot")
    return TrainConfig(model=model, mesh=MeshConfig(data=2, fsdp=-1),
                       optimizer=OptimizerConfig(peak_lr=1e-2, warmup_steps=2),
                       loss=LossConfig(aux_free_coef=1e-3), ema=EMAConfig(decay=0.9), total_steps=total_steps,
                       log_every_steps=1, checkpoint_every_steps=checkpoint_every, async_checkpoints=True)


if __name__ == "__main__":
    workdir, total, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = train(config(total, every), workdir, CountingData(), progress=False)
    if not out["stopped_early"]:  # the final state, for the tests to compare runs
        import jax  # noqa: E402
        leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(out["state"]))[0]
        np.savez(os.path.join(workdir, "final_state.npz"),
                 **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    print("STOPPED_EARLY" if out["stopped_early"] else "DONE", out["step"], flush=True)
