"""Generic evaluation during and after training: the LM loss over held-out packed batches.

Task accuracy on the embedded toy corpora (greedy answers to held-out prompts) is `ernie_jax.synthetic.tasks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.losses import token_cross_entropy


def heldout_loss(model: nnx.Module, batches: list[dict], keys: tuple[str, ...]) -> float:
    """Per-token cross-entropy over the `loss_mask` of packed held-out batches. The model gets `tokens`,
    `segment_ids` (and the key mask they imply) and the batch entries named by `keys` as keyword arguments."""
    g, st = nnx.split(model)
    ce = jax.jit(lambda st, b: token_cross_entropy(nnx.merge(g, st)(
        b["tokens"], segment_ids=b["segment_ids"], attention_mask=b["segment_ids"] != 0,
        **{k: b[k] for k in keys}).logits, b["targets"]))
    tot = cnt = 0.0
    for b in batches:
        m = np.asarray(b["loss_mask"], np.float32)
        tot += float(np.sum(np.asarray(ce(st, {k: jnp.asarray(b[k]) for k in ("tokens", "targets",
                                                                           "segment_ids") + keys})) * m))
        cnt += float(m.sum())
    return tot / max(cnt, 1.0)
