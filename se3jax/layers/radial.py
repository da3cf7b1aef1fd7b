"""Radial profile: the MLP that turns edge scalars into the weights of every TFN path."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from se3jax.execution import Execution
from se3jax.precision import at_least_f32, get_policy


def scaled_normal_columns(column_scale: np.ndarray):
    """Initialiser for a ``[hidden, n]`` kernel whose column ``j`` has std ``column_scale[j]``.

    The convolution sums many path terms per output; scaling each path's weights by its fan-in
    keeps activations O(1) at initialisation whatever the fibers.
    """
    def init(key, shape, dtype=jnp.float32):
        assert shape[1] == column_scale.shape[0], (shape, column_scale.shape)
        return jax.random.normal(key, shape, dtype) * jnp.asarray(column_scale, dtype) / np.sqrt(shape[0])
    return init


class RadialProfile(nn.Module):
    """MLP on edge scalars: Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm -> ReLU -> Linear.

    Returns the last hidden activation ``[E, mid_dim]`` and the last layer's bias-free kernel
    ``[mid_dim, n_weights]`` rather than their product: the convolution applies that kernel
    per fusion group, producing each group's per-edge weights directly in the layout the group
    contracts with (the canonical kernel is one parameter whatever the fusion level).
    """

    n_weights: int
    kernel_init: Callable = nn.initializers.lecun_normal()  # e.g. scaled_normal_columns(...)
    mid_dim: int = 32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, edge_scalars: jax.Array):
        h = at_least_f32(edge_scalars)  # [R, S]
        precision = get_policy(self.execution.precision).dot_precision
        for i in range(2):
            h = nn.Dense(self.mid_dim, precision=precision, name=f"dense_{i}")(h)
            h = nn.LayerNorm(name=f"norm_{i}")(h)
            h = nn.relu(h)
        kernel = self.param("kernel_out", self.kernel_init, (self.mid_dim, self.n_weights))
        return h, kernel
