"""LinearSE3: per-degree channel mixing. No bias: a bias would break equivariance for d > 0."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from se3jax.execution import Execution
from se3jax.fiber import Features, Fiber
from se3jax.initialisation import param
from se3jax.precision import at_least_f32, get_policy


class LinearSE3(nn.Module):
    """``out[d] = W_d @ x[d]`` over channels, for every degree of ``fiber_out``.

    Every output degree must be present in ``fiber_in``.
    """

    fiber_in: Fiber
    fiber_out: Fiber
    execution: Execution = Execution()  # only its precision matters here

    @nn.compact
    def __call__(self, features: Features) -> Features:
        self.fiber_in.check_features(features, "LinearSE3 input")
        missing = [d for d in self.fiber_out.degrees if d not in self.fiber_in]
        if missing:
            raise ValueError(f"LinearSE3 cannot create degrees {missing} absent from {self.fiber_in}")
        precision = get_policy(self.execution.precision).dot_precision
        out = {}
        for d, c_out in self.fiber_out:
            c_in = self.fiber_in[d]
            # stored as the reference's randn / sqrt(c_in) and used as is: Adam's steps are then
            # the same size relative to the weights as in the reference
            w = param(self, f"weight_{d}", "normal", 1.0 / np.sqrt(c_in), (c_out, c_in))
            x = at_least_f32(features[d])  # [N, i, m]
            out[d] = jnp.einsum("oi,nim->nom", w.astype(x.dtype), x, precision=precision)
        return out
