"""Radial profiles: the MLPs that turn edge scalars into the weights of every TFN path, and the
dense layers' initialisation (the reference's: PyTorch's ``nn.Linear`` defaults).

A convolution's paths share radial MLP *trunks* (the hidden layers) as in NVIDIA's reference
with its fully fused convolutions: one trunk for all paths when both fibers have uniform
channels over degrees 0..L; one per output degree when only the input does; one per input
degree when only the output does; else one per path. The trunks are a property of the fibers,
never of the fusion level, so the parameters are the same at every level.

>>> from se3jax.fiber import Fiber
>>> hidden, first_kv = Fiber.create(4, 32), Fiber({0: 32, 1: 16, 2: 16, 3: 16})
>>> len(radial_trunks(hidden, hidden, 3)), len(radial_trunks(hidden, Fiber({0: 128}), 3))
(1, 1)
>>> radial_trunks(Fiber({0: 6}), first_kv, 3)  # the first layer: one trunk per path
(((0, 0),), ((0, 1),), ((0, 2),), ((0, 3),))
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.initialisation import Initialiser, param
from se3jax.precision import at_least_f32, get_policy

LAYER_NORM_EPSILON = 1e-5  # PyTorch's default, as the reference


def _path(parent: nn.Module | None, name: str) -> tuple[str, ...]:
    """The path of ``parent``'s child ``name`` (``None``: the layer is used on its own)."""
    return () if parent is None else (*parent.path, name)


def torch_dense(
    parent: nn.Module | None, features: int, fan_in: int, precision, name: str, use_bias: bool = True
) -> nn.Dense:
    """``nn.Dense`` (a child of ``parent``) initialised as PyTorch's ``nn.Linear(fan_in,
    features)``: weights and biases uniform in +-1/sqrt(fan_in)."""
    bound, path = 1.0 / np.sqrt(fan_in), _path(parent, name)
    return nn.Dense(
        features,
        use_bias=use_bias,
        precision=precision,
        kernel_init=Initialiser((*path, "kernel"), "uniform", bound),
        bias_init=Initialiser((*path, "bias"), "uniform", bound),
        name=name,
    )


def layer_norm(parent: nn.Module | None, name: str) -> nn.LayerNorm:
    """LayerNorm (a child of ``parent``) as the reference's: epsilon 1e-5, exact two-pass
    variance, scale 1 and bias 0 at first."""
    path = _path(parent, name)
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON,
        use_fast_variance=False,
        scale_init=Initialiser((*path, "scale"), "constant", 1.0),
        bias_init=Initialiser((*path, "bias"), "constant", 0.0),
        name=name,
    )


def radial_trunks(fiber_in: Fiber, fiber_out: Fiber, max_degree: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The convolution's ``(d_in, d_out)`` paths grouped by the radial MLP trunk they share."""
    full = tuple(range(max_degree + 1))
    fused_in = bool(fiber_in.uniform_channels) and fiber_in.degrees == full
    fused_out = bool(fiber_out.uniform_channels) and fiber_out.degrees == full
    if fused_in and fused_out:
        return (tuple((a, b) for b in fiber_out.degrees for a in fiber_in.degrees),)
    if fused_in:
        return tuple(tuple((a, b) for a in fiber_in.degrees) for b in fiber_out.degrees)
    if fused_out:
        return tuple(tuple((a, b) for b in fiber_out.degrees) for a in fiber_in.degrees)
    return tuple(((a, b),) for b in fiber_out.degrees for a in fiber_in.degrees)


class RadialProfile(nn.Module):
    """MLP on edge scalars: Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm -> ReLU -> Linear.

    Returns ``(hidden, kernel)``: ``hidden``, a pure function of this module's parameters from
    edge scalars ``[R, S]`` to the last hidden activation ``[R, mid_dim]``, and the last layer's
    bias-free kernel ``[mid_dim, n_weights]``, rather than their product. The convolution calls
    ``hidden`` inside its edge chunks (only one chunk's activations live; recomputed with the
    chunk in the backward pass instead of stored for every edge: at 10^5 edges they were a
    third of a training step's peak memory) and applies the kernel per fusion group, producing
    each group's per-edge weights directly in the layout the group contracts with (the kernel
    is one parameter whatever the fusion level).

    >>> import jax, jax.numpy as jnp
    >>> scalars = jnp.ones((7, 5))
    >>> params = RadialProfile(n_weights=10).init(jax.random.PRNGKey(0), scalars)
    >>> hidden, kernel = RadialProfile(n_weights=10).apply(params, scalars)
    >>> hidden(scalars).shape, kernel.shape
    ((7, 32), (32, 10))
    """

    n_weights: int
    mid_dim: int = 32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, edge_scalars: jax.Array):
        precision = get_policy(self.execution.precision).dot_precision
        layers, width = [], edge_scalars.shape[-1]
        for i in range(2):
            dense = torch_dense(self, self.mid_dim, width, precision, name=f"dense_{i}")
            norm = layer_norm(self, name=f"norm_{i}")
            # parameters made from a one-row example (their shapes need only the width)
            norm(dense(jnp.zeros((1, width), jnp.float32)))
            layers.append((dense.clone(parent=None), dense.variables, norm.clone(parent=None), norm.variables))
            width = self.mid_dim

        def hidden(scalars: jax.Array) -> jax.Array:
            h = at_least_f32(scalars)
            for dense, dense_variables, norm, norm_variables in layers:
                h = nn.relu(norm.apply(norm_variables, dense.apply(dense_variables, h)))
            return h

        bound = 1.0 / np.sqrt(self.mid_dim)  # PyTorch's nn.Linear, as the other layers
        kernel = param(self, "kernel_out", "uniform", bound, (self.mid_dim, self.n_weights))
        return hidden, kernel


def stack_trunks(outputs: list[tuple], columns: list[np.ndarray], n_weights: int):
    """Several trunks' ``(hidden: [R, S] -> [R, mid], kernel [mid, n_t])`` -> one ``(hidden:
    [R, S] -> [R, T mid], kernel [T mid, n_weights])`` whose kernel is block-sparse: trunk ``t``
    feeds only its ``columns[t]`` of the canonical layout. (Only layers with several trunks pay
    for the zeros: the first layer, whose weights are few.)"""
    if len(outputs) == 1:
        return outputs[0]
    hiddens = [h for h, _ in outputs]

    def hidden(scalars: jax.Array) -> jax.Array:
        return jnp.concatenate([h(scalars) for h in hiddens], axis=-1)

    blocks = [jnp.zeros((k.shape[0], n_weights), k.dtype).at[:, cols].set(k) for (_, k), cols in zip(outputs, columns)]
    return hidden, jnp.concatenate(blocks, axis=0)
