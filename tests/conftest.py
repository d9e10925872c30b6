"""Test set-up: an emulated 8-device CPU mesh, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (AOT tier) is installed but there is no TPU
# compile-only TPU topologies need no exclusive TPU lock; xdist workers would otherwise contend for it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
