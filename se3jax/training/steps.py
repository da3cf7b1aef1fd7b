"""Loss, train state, and the jit/shard_map-ready train and eval steps (one definition each).

The state is Flax's :class:`flax.training.train_state.TrainState` (step, parameters, the
optimizer ``tx`` and its state) with the recipe's additions: fp16 loss scaling (Flax's
:class:`~flax.training.dynamic_scale.DynamicScale`) and a moving average of the weights. The
steps take the model explicitly (the state's ``apply_fn`` is unused): execution choices share the
parameters, so one state trains or evaluates under any execution plan.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import jraph
import optax
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale

from se3jax.graphs import TARGET, padding_masks
from se3jax.initialisation import init_params

INITIAL_LOSS_SCALE = 2.0**15  # fp16's largest power of two is 2^15: the first steps rarely overflow


class TrainState(train_state.TrainState):
    """Flax's train state plus ``loss_scale`` (fp16 only) and ``ema_params``, an exponential
    moving average of the parameters with ``ema_decay`` (when asked for)."""

    loss_scale: DynamicScale | None = None
    ema_params: Any = None
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
    """A fresh state: ``params`` drawn from ``rng`` on the host (:func:`se3jax.init_params`; or
    the ones given). ``loss_scaling``: dynamic loss scaling from 2^15, halved on overflow (never
    below 1), doubled after 2,000 finite steps. ``ema_decay > 0`` also keeps a moving average of
    the parameters."""
    params = init_params(model, rng, graphs) if params is None else params
    loss_scale = DynamicScale(
        fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(INITIAL_LOSS_SCALE, jnp.float32), minimum_scale=1.0
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=None,  # the steps take the model: one state runs under any execution plan
        params=params,
        tx=optimizer,
        opt_state=optimizer.init(params),
        loss_scale=loss_scale if loss_scaling else None,
        ema_params=jax.tree.map(jnp.array, params) if ema_decay > 0 else None,
        ema_decay=float(ema_decay),
    )


def masked_l1(predictions: jax.Array, targets: jax.Array, graph_mask: jax.Array):
    """Sum of |prediction - target| over real graphs, and their count (for exact means
    across devices and batches of different fill)."""
    err = jnp.where(graph_mask, jnp.abs(predictions.astype(jnp.float32) - targets), 0.0)
    return jnp.sum(err), jnp.sum(graph_mask.astype(jnp.float32))


def make_train_step(model, *, axis_name: str | None = None):
    """``step(state, graphs) -> (state, metrics)``: L1 loss of ``model`` on normalised targets,
    gradients averaged over real graphs (and summed over devices under ``axis_name``), the
    state's optimizer update; with a loss scale (fp16), non-finite steps are skipped."""

    def step(state: TrainState, graphs: jraph.GraphsTuple):
        graph_mask = padding_masks(graphs).graphs

        def loss_fn(params):
            abs_sum, count = masked_l1(model.apply(params, graphs), graphs.globals[TARGET], graph_mask)
            if axis_name is not None:
                # Divide by the real graphs of ALL devices: the sum of the per-device
                # gradients is then exactly the gradient of the global mean.
                count = jax.lax.psum(count, axis_name)
            return abs_sum / jnp.maximum(count, 1.0), (abs_sum, count)

        if state.loss_scale is None:
            grads, (abs_sum, count) = jax.grad(loss_fn, has_aux=True)(state.params)
            grads = grads if axis_name is None else jax.lax.psum(grads, axis_name)
            loss_scale = finite = None
        else:  # DynamicScale averages gradients over devices: the loss is times their count
            devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
            times_devices = lambda params: (lambda loss, aux: (loss * devices, aux))(*loss_fn(params))
            scaled_grad = state.loss_scale.value_and_grad(times_devices, has_aux=True, axis_name=axis_name)
            loss_scale, finite, (_, (abs_sum, count)), grads = scaled_grad(state.params)
        if axis_name is not None:
            abs_sum = jax.lax.psum(abs_sum, axis_name)
        with jax.named_scope("optimizer"):
            new_state = state.apply_gradients(grads=grads, loss_scale=loss_scale)
        if finite is not None:  # skip the update on overflow
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_state = new_state.replace(
                params=keep(new_state.params, state.params), opt_state=keep(new_state.opt_state, state.opt_state)
            )
        if state.ema_params is not None:
            decay = state.ema_decay
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new_state.params)
            new_state = new_state.replace(ema_params=ema)
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
