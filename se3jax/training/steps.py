"""Loss, train state, and the jit/pmap-ready train and eval steps (one definition each)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import jraph
import optax

from se3jax.graphs import TARGET, padding_masks
from se3jax.precision import DynamicLossScale, all_finite


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: DynamicLossScale | None = None  # fp16 only
    ema_params: Any = None  # an exponential moving average of params (when asked for)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def eval_params(self):
        """What evaluation and inference use: the moving average if kept, else the params."""
        return self.params if self.ema_params is None else self.ema_params


def create_train_state(
    model,
    optimizer: optax.GradientTransformation,
    graphs: jraph.GraphsTuple,
    rng: jax.Array,
    loss_scaling: bool = False,
    params=None,
    ema_decay: float = 0.0,
) -> TrainState:
    """A fresh state: ``params`` initialised from ``rng`` (or the ones given). ``ema_decay >
    0`` also keeps a moving average of the parameters, updated after every step."""
    params = jax.jit(model.init)(rng, graphs) if params is None else params
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        loss_scale=DynamicLossScale.create() if loss_scaling else None,
        ema_params=jax.tree.map(jnp.array, params) if ema_decay > 0 else None,
        ema_decay=float(ema_decay),
    )


def masked_l1(predictions: jax.Array, targets: jax.Array, graph_mask: jax.Array):
    """Sum of |prediction - target| over real graphs, and their count (for exact means
    across devices and batches of different fill)."""
    err = jnp.where(graph_mask, jnp.abs(predictions.astype(jnp.float32) - targets), 0.0)
    return jnp.sum(err), jnp.sum(graph_mask.astype(jnp.float32))


def make_train_step(model, optimizer: optax.GradientTransformation, axis_name: str | None = None):
    """``step(state, graphs) -> (state, metrics)``: L1 loss on normalised targets, gradients
    averaged over real graphs (and over devices with ``lax.pmean`` under ``axis_name``),
    optimizer update; with a loss scale (fp16), non-finite steps are skipped."""

    def step(state: TrainState, graphs: jraph.GraphsTuple):
        graph_mask = padding_masks(graphs).graphs
        targets = graphs.globals[TARGET]

        def loss_fn(params):
            abs_sum, count = masked_l1(model.apply(params, graphs), targets, graph_mask)
            if axis_name is not None:
                # Divide by the real graphs of ALL devices: the psum of the per-device
                # gradients is then exactly the gradient of the global mean.
                count = jax.lax.psum(count, axis_name)
            local = abs_sum / jnp.maximum(count, 1.0)
            scaled = state.loss_scale.scale_loss(local) if state.loss_scale is not None else local
            return scaled, (abs_sum, count)

        grads, (abs_sum, count) = jax.grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
            abs_sum = jax.lax.psum(abs_sum, axis_name)
        loss_scale = state.loss_scale
        if loss_scale is not None:
            grads = loss_scale.unscale(grads)
            finite = all_finite(grads)
            loss_scale = loss_scale.adjust(finite)
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        if state.loss_scale is not None:  # skip the update on overflow
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema_params = state.ema_params
        if ema_params is not None:
            decay = state.ema_decay
            ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params, loss_scale=loss_scale
        )
        metrics = {"loss": abs_sum / jnp.maximum(count, 1.0), "num_graphs": count}
        if loss_scale is not None:
            metrics["loss_scale"] = loss_scale.scale
        return new_state, metrics

    return step


def make_eval_step(model, axis_name: str | None = None):
    """``step(params, graphs) -> {"abs_error_sum", "num_graphs"}`` on normalised targets,
    with the model's inference execution plan (same parameters, same function)."""
    model = model.clone(execution=model.execution.for_mode("infer"))

    def step(params, graphs: jraph.GraphsTuple):
        graph_mask = padding_masks(graphs).graphs
        abs_sum, count = masked_l1(model.apply(params, graphs), graphs.globals[TARGET], graph_mask)
        if axis_name is not None:
            abs_sum, count = jax.lax.psum((abs_sum, count), axis_name)
        return {"abs_error_sum": abs_sum, "num_graphs": count}

    return step
