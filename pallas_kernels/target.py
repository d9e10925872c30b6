"""Which kernel a call lowers to: the Mosaic TPU kernel or the Pallas interpreter.

`interpret=None` is decided when lowering (`jax.lax.platform_dependent`), not by `jax.default_backend()` at
trace time, so an ahead-of-time compile for a TPU topology from a CPU host gets the Mosaic kernel while a CPU
run gets the interpreter. Both variants are traced; lowering keeps only the target's.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax

T = TypeVar("T")


def on_target(interpret: bool | None, fn: Callable[..., T], *args) -> T:
    """fn(*args, interpret=...): the given flag, or with interpret=None False (Mosaic) when lowering for TPU
    and True (interpreter) for any other platform. Call it outside autodiff (in a custom_vjp's forward and
    backward rules), so the platform switch itself is never differentiated."""
    if interpret is None:
        return jax.lax.platform_dependent(*args, tpu=functools.partial(fn, interpret=False),
                                          default=functools.partial(fn, interpret=True))
    return fn(*args, interpret=bool(interpret))
