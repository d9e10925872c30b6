"""The training step: a pure function over `TrainState`, compiled once with `jax.jit`.

One step = gradient accumulation over the micro-batches of the batch (`lax.scan`), the losses (token-
balanced LM loss, MoE aux / z / router-orthogonality losses, MTP), global-norm clipped AdamW, then the
router correction-bias update (aux-loss-free balancing), the optional decoupled orthogonality step and the
EMA. A non-finite loss or gradient leaves the whole state unchanged and is counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from ernie_jax.losses import (moe_aux_loss, mtp_loss, router_orthogonal_loss, router_z_loss, token_balanced_loss,
                              token_cross_entropy)
from ernie_jax.model.balancing import router_kernels, update_correction_biases
from ernie_jax.model.mtp import mtp_inputs, mtp_targets
from ernie_jax.train.ema import EMAConfig, ema_update

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# VL batches (`ernie_jax.data.make_multimodal_pipeline`) add these; the VL model computes its 3D positions
# from them (and the segment ids) instead of reading `positions`.
VL_KEYS = ("mm_token_type_ids", "moe_mm_token_type_ids", "pixel_values", "image_grid_thw")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    aux_coef: float = 0.0  # HF-style load-balancing loss (Baidu 21B / 300B: 1e-5)
    z_coef: float = 0.0
    orth_coef: float = 0.0  # router orthogonality
    orth_in_loss: bool = True  # False: a separate step W -= lr * orth_coef * dL_orth/dW after the optimizer
    mtp_coef: float = 0.3
    aux_free_coef: float = 0.0  # correction-bias step size (Baidu: 1e-3); 0 = off


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates done
    params: Any  # nested dict of arrays: the model's nnx.Param state
    buffers: Any  # nested dict: the other variables (router correction biases)
    opt_state: Any
    ema: Any  # fp32 copy of params, or None
    nonfinite_run: jax.Array  # [] consecutive skipped steps
    nonfinite_total: jax.Array  # [] skipped steps in all


def split_model(model: nnx.Module):
    """(graphdef, Param state, other state) of a model."""
    return nnx.split(model, nnx.Param, ...)


def _fresh_state(params: Any, buffers: Any, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    """The initial TrainState of these params / buffers (fresh copies: the state is donated to the step)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                      buffers=jax.tree.map(jnp.copy, buffers), opt_state=tx.init(params),
                      ema=jax.tree.map(lambda p: p.astype(jnp.float32), params) if ema else None,
                      nonfinite_run=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32))


def abstract_train_state(params: Any, buffers: Any, tx: optax.GradientTransformation, *, ema: bool) -> TrainState:
    """The TrainState of pure-dict `params` / `buffers` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs,
    nothing allocated. When the params carry NamedShardings (a mesh), every leaf carries its sharding too:
    optimizer moments and the EMA (fp32) sharded like their parameters, the rest replicated."""
    shapes = jax.eval_shape(lambda p, b: _fresh_state(p, b, tx, ema), params, buffers)
    mesh = next((a.sharding.mesh for a in jax.tree.leaves(params)
                 if isinstance(getattr(a, "sharding", None), NamedSharding)), None)
    if mesh is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(shapes, params, mesh))


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool) -> TrainState:
    """The initial state, laid out as `abstract_train_state` says (on a mesh: the model's shardings)."""
    _, params, buffers = split_model(model)
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    target = abstract_train_state(params, buffers, tx, ema=ema)
    sharded = isinstance(jax.tree.leaves(target)[0].sharding, NamedSharding)
    shardings = jax.tree.map(lambda s: s.sharding, target) if sharded else None
    return jax.jit(lambda p, b: _fresh_state(p, b, tx, ema), out_shardings=shardings)(params, buffers)


def state_shardings(state: Any, params: Any, mesh) -> Any:
    """NamedShardings for a TrainState-shaped tree: a leaf whose path ends with a parameter's path (the
    parameter itself, its Adam moments, its EMA) gets that parameter's sharding, the rest is replicated."""
    by_path = {jax.tree_util.keystr(p): a.sharding for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, _):
        key = jax.tree_util.keystr(path)
        for pk, sh in by_path.items():
            if key.endswith(pk) and isinstance(sh, NamedSharding):
                return sh
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, state)


def merge_model(graphdef, abstract_params, abstract_buffers, params, buffers) -> nnx.Module:
    """The module for pure-dict params / buffers (the abstract states give the variable types)."""
    p, b = jax.tree.map(lambda x: x, (abstract_params, abstract_buffers))  # fresh copies, filled in place
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(b, buffers)
    return nnx.merge(graphdef, p, b)


# A post-training objective in place of the LM loss: (model, micro-batch) -> (loss, aux). aux holds scalar
# metrics (averaged over the micro-batches into the step's metrics) and, for MoE models, "moe_stats" (the
# forward's MoEStats: the aux / z / orthogonality losses and the bias update then apply as in pre-training).
Objective = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_cfg: LossConfig, *, ema_cfg: EMAConfig = EMAConfig(), objective: Objective | None = None,
                    batch_keys: tuple[str, ...] = ()) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics). batch: dict of [A, B, S] arrays (A micro-batches) with keys
    tokens, targets, loss_mask and optionally segment_ids, positions (packed rows).

    objective: None for the LM loss (token-balanced cross-entropy + MTP); else a post-training `Objective`
    (DPO, GRPO), which reads the batch keys BATCH_KEYS + VL_KEYS + `batch_keys`."""
    config = model.config
    graphdef, abs_params, abs_buffers = split_model(nnx.eval_shape(lambda: model))
    depth = config.num_nextn_predict_layers if loss_cfg.mtp_coef and objective is None else 0
    keys = BATCH_KEYS + VL_KEYS + tuple(batch_keys)

    def loss_fn(params, buffers, mb):
        model_ = merge_model(graphdef, abs_params, abs_buffers, params, buffers)
        if objective is not None:
            loss, aux = objective(model_, mb)
            aux = dict(aux)
            return _moe_losses(loss, aux, aux.pop("moe_stats", None), params)
        seg = mb.get("segment_ids")
        if config.vision is not None:
            extra = {k: mb[k] for k in VL_KEYS if k in mb}
        else:
            extra = {"positions": mb.get("positions")}
        out = model_(mb["tokens"], segment_ids=seg, attention_mask=None if seg is None else seg != 0,
                     mtp_input_ids=mtp_inputs(mb["tokens"], depth) if depth else None, **extra)
        ce = token_cross_entropy(out.logits, mb["targets"])
        m = mb["loss_mask"].astype(jnp.float32)
        loss, _ = token_balanced_loss(ce, m)
        aux = {"ce_sum": jnp.sum(ce * m), "tokens": jnp.sum(m)}
        if depth:
            tgt, msk = mtp_targets(mb["targets"], mb["loss_mask"], seg, depth)
            aux["mtp_loss"] = mtp_loss(out.mtp_logits, tgt, msk)
            loss = loss + loss_cfg.mtp_coef * aux["mtp_loss"]
        return _moe_losses(loss, aux, out.moe_stats, params)

    def _moe_losses(loss, aux, st, params):
        """Adds the MoE router losses of the forward's statistics `st` (None for a dense model)."""
        if st is not None:
            aux.update(aux_loss=moe_aux_loss(st), z_loss=router_z_loss(st), usage=st.usage)
            loss = loss + loss_cfg.aux_coef * aux["aux_loss"] + loss_cfg.z_coef * aux["z_loss"]
            if loss_cfg.orth_coef and loss_cfg.orth_in_loss:
                loss = loss + loss_cfg.orth_coef * sum(router_orthogonal_loss(k) for k in router_kernels(params))
        return loss, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        batch = {k: v for k, v in batch.items() if k in keys}
        n_micro = batch["tokens"].shape[0]

        def micro(carry, mb):
            g_acc, l_acc = carry
            (loss, aux), g = grad_fn(state.params, state.buffers, mb)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, l_acc + loss), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, loss_sum), aux = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), batch)
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = schedule(state.step)
        if loss_cfg.orth_coef and not loss_cfg.orth_in_loss and "usage" in aux:
            orth_grads = jax.grad(lambda p: sum(router_orthogonal_loss(k) for k in router_kernels(p)))(params)
            params = jax.tree.map(lambda p, g: p - lr * loss_cfg.orth_coef * g.astype(p.dtype), params, orth_grads)
        buffers = state.buffers
        if loss_cfg.aux_free_coef and "usage" in aux:
            buffers = update_correction_biases(buffers, jnp.sum(aux["usage"], axis=0), loss_cfg.aux_free_coef)
        ema = state.ema if state.ema is None else ema_update(state.ema, params, ema_cfg.effective_decay)

        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
            buffers=keep(buffers, state.buffers), opt_state=keep(opt_state, state.opt_state),
            ema=None if ema is None else keep(ema, state.ema),
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
        metrics = {"grad_norm": grad_norm, "lr": lr, "skipped": (~finite).astype(jnp.int32),
                   "nonfinite_run": new_state.nonfinite_run}
        if objective is None:
            tokens = jnp.sum(aux["tokens"])
            metrics.update(loss=jnp.sum(aux["ce_sum"]) / jnp.maximum(tokens, 1.0), tokens=tokens)
            names: Any = ("aux_loss", "z_loss", "mtp_loss")
        else:
            metrics["loss"] = loss_sum / n_micro
            names = [k for k in aux if k != "usage"]
        for k in names:
            if k in aux:
                metrics[k] = jnp.mean(aux[k])
        if "usage" in aux:
            usage = jnp.sum(aux["usage"], axis=0)  # [L_moe, E]
            metrics["expert_imbalance"] = jnp.mean(jnp.max(usage, -1) / jnp.maximum(jnp.mean(usage, -1), 1e-9))
        return new_state, metrics

    return step
