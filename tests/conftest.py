"""Test set-up: an emulated 8-device CPU mesh, set before jax is imported anywhere."""

import os
import sys

# LLVM's optimisation level and its expensive passes change how fast the CPU code runs, not what the programs
# compute; the suite's programs are tiny, so its time is mostly compilation, which these shorten (docs/benchmarks.md,
# design measurements). Test scripts run as subprocesses (their own device counts) take them from ERNIE_TEST_XLA_FLAGS.
os.environ["ERNIE_TEST_XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), os.environ["ERNIE_TEST_XLA_FLAGS"],
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (AOT tier) is installed but there is no TPU
# compile-only TPU topologies need no exclusive TPU lock; xdist workers would otherwise contend for it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# the suite runs with --import-mode=importlib: make the shared helpers of this folder (random_weights.py) importable
sys.path.append(os.path.dirname(__file__))


def pytest_collection_modifyitems(items):
    """The training and TPU-compile tests (the longest, last in file order) go first, so that the xdist
    workers finish together instead of one running a long test while the other idles."""
    first = ("train", "tpu_aot")
    items.sort(key=lambda item: item.path.parent.name not in first)
