"""A randomised Hadamard rotation of the attention head dimension D (a power of two).

R = H_D · diag(s) / sqrt(D), H_D the Sylvester Hadamard matrix (entries ±1, H Hᵀ = D·I) and s random ±1 signs
drawn from a seed, applied to each vector x [..., D] as R x (the signs flip channels first, then the transform
mixes them): R is orthogonal, so rotating queries and keys alike leaves every score q·k = (Rq)·(Rk)
unchanged, while each rotated channel is a ±-mix of all D channels: a few outlier channels of K are spread over
the whole head and a per-token quantization scale (the max over D) no longer sizes itself to them. The signs
make the rotation differ from the plain transform, so structured inputs (a key aligned with a Hadamard row)
do not concentrate again; flipping signs after the transform would not help, since a symmetric per-token
quantizer is blind to sign flips of its output channels.

The rotation is applied as a dense [D, D] matmul: under XLA on the CPU it is no slower than the log2(D)-stage
butterfly (fast Walsh–Hadamard transform; docs/benchmarks.md, design measurements), and on a TPU it is one MXU
pass where the butterfly is a chain of relayouts. The butterfly builds the matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def check_dim(d: int) -> None:
    """Raises ValueError unless d is a power of two (the Sylvester construction's sizes)."""
    if not (isinstance(d, (int, np.integer)) and d >= 1 and d & (d - 1) == 0):
        raise ValueError(f"a Hadamard rotation needs head_dim to be a power of two, got head_dim={d!r}")


def random_signs(d: int, seed: int) -> np.ndarray:
    """[D] float64 of ±1, a function of (d, seed) only."""
    check_dim(d)
    return np.where(np.random.default_rng(seed).integers(0, 2, d) == 1, 1.0, -1.0)


def _walsh_hadamard(x: np.ndarray) -> np.ndarray:
    """The unnormalised Walsh–Hadamard transform of each row of x [N, D] (log2 D butterfly stages) = x H_D."""
    n, d = x.shape
    h = 1
    while h < d:
        y = x.reshape(n, d // (2 * h), 2, h)
        x = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2).reshape(n, d)
        h *= 2
    return x


@functools.lru_cache(maxsize=16)
def _signed_hadamard(d: int, seed: int) -> np.ndarray:
    """H_D · diag(s) [D, D], entries ±1 (exact in any float dtype)."""
    check_dim(d)
    m = _walsh_hadamard(np.eye(d)) * random_signs(d, seed)[None, :]  # rows of I transformed: H_D (symmetric)
    m.setflags(write=False)
    return m


def rotation_matrix(d: int, seed: int) -> np.ndarray:
    """R = H_D · diag(s) / sqrt(D) [D, D] float64, orthogonal (R Rᵀ = I)."""
    return _signed_hadamard(d, seed) / np.sqrt(d)


def _apply(x: jax.Array, seed: int, transpose: bool, out_dtype) -> jax.Array:
    # 1/sqrt(D) scales the fp32 accumulator: a bf16 R would round all its entries alike (|R_ij| = 1/sqrt(D)),
    # scaling every score by the same wrong constant
    d = x.shape[-1]
    pm = jnp.asarray(_signed_hadamard(d, seed), x.dtype)
    eq = "...e,ed->...d" if transpose else "...d,ed->...e"  # rotate: y_e = sum_d M_ed x_d
    out = jnp.einsum(eq, x, pm, preferred_element_type=jnp.float32) * (1.0 / np.sqrt(d))
    return out.astype(x.dtype if out_dtype is None else out_dtype)


def rotate(x: jax.Array, seed: int, out_dtype=None) -> jax.Array:
    """x [..., D] -> R x [..., D] in `out_dtype` (default x's)."""
    return _apply(x, seed, False, out_dtype)


def unrotate(x: jax.Array, seed: int, out_dtype=None) -> jax.Array:
    """The inverse: y [..., D] -> Rᵀ y [..., D] in `out_dtype` (default y's)."""
    return _apply(x, seed, True, out_dtype)
