"""One process of a 2-process `jax.distributed` training run on localhost (CPU, gloo), for
test_distributed.py:

    python distributed_script.py PORT PROCESS_ID WORKDIR TOTAL_STEPS [STOP_AT]

Each process has 2 CPU devices (4 in all, mesh fsdp=4) and reads its half of every global batch of the
embedded default data through `ernie_jax.data.make_pipeline`. With STOP_AT, every process sends itself a
SIGTERM while drawing batch STOP_AT (the same step on both), so the loop saves at that step boundary and
exits cleanly: a preemption that a second run resumes from.
"""

import os
import signal
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("ERNIE_TEST_XLA_FLAGS", "")  # not the suite's 8 emulated devices

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if os.environ.get("ERNIE_TEST_COMPILE_CACHE"):  # the three runs of the test compile the same programs
    jax.config.update("jax_compilation_cache_dir", os.environ["ERNIE_TEST_COMPILE_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def config(total_steps):
    import ernie_jax
    from ernie_jax.sharding import MeshConfig
    from ernie_jax.train.loop import TrainConfig
    from ernie_jax.train.optimizer import OptimizerConfig
    from ernie_jax.train.ema import EMAConfig
    from ernie_jax.train.step import LossConfig

    # vocab 512: the embedded corpus' tokenizer
    model = ernie_jax.get_preset("tiny-test", vocab_size=512, num_hidden_layers=2)
    return TrainConfig(model=model, mesh=MeshConfig(fsdp=-1), optimizer=OptimizerConfig(peak_lr=1e-2, warmup_steps=2),
                       loss=LossConfig(), ema=EMAConfig(decay=0.9), total_steps=total_steps, log_every_steps=1,
                       checkpoint_every_steps=100, async_checkpoints=True, peak_tflops=1.0)


class StopAt:
    """Passes the pipeline through; raises SIGTERM in this process while batch `stop_at` is drawn."""

    def __init__(self, it, stop_at):
        self.it, self.stop_at, self.drawn = it, stop_at, 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def main():
    port, pid, workdir, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    stop_at = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

    from ernie_jax.data import make_pipeline
    from ernie_jax.synthetic.text import default_data_config
    from ernie_jax.train.loop import train

    data = make_pipeline(default_data_config("train", seq_len=32, global_batch_size=8),
                         process_index=jax.process_index(), process_count=jax.process_count())
    if stop_at:
        data = StopAt(data, stop_at)
    out = train(config(total), workdir, data, progress=False)
    print(f"process {jax.process_index()}: {'STOPPED_EARLY' if out['stopped_early'] else 'DONE'} {out['step']}",
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
