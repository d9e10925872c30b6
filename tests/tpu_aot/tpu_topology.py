"""Virtual TPU topologies for the tpu_aot tests: ahead-of-time compilation on a host without a TPU (MaxText's
train_compile trick): with libtpu installed (`pip install "jax[tpu]"`), `virtual_tpu_devices("v5p:2x2x1")`
gives compile-only TPU devices to build a mesh on; `jax.jit(...).lower(...).compile()` then runs the real
TPU compiler and `memory_analysis()` reports per-chip memory.
"""

from __future__ import annotations

import functools
import os

import jax


def libtpu_missing() -> str | None:
    """None when libtpu can be found, else the reason (with the install command)."""
    try:
        import libtpu  # noqa: F401  (only locates libtpu.so; it is loaded at the first topology)
    except ImportError as e:
        return (f"libtpu is not installed ({e}); TPU ahead-of-time compiles need the TPU compiler: "
                f"pip install 'jax[tpu]=={jax.__version__}'")
    return None


@functools.cache
def virtual_tpu_devices(topology: str) -> tuple[jax.Device, ...]:
    """Compile-only devices of a TPU topology such as "v5p:2x2x1" or "v6e:2x2"."""
    reason = libtpu_missing()
    if reason:
        raise RuntimeError(reason)
    # compile-only use needs no exclusive lock on the (absent) TPU; other jax processes may hold it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415

    return tuple(topologies.get_topology_desc(topology, "tpu").devices)
