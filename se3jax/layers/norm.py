"""NormSE3: equivariant nonlinearity acting on the norms of each degree's features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from se3jax.fiber import Fiber
from se3jax.layers.radial import layer_norm
from se3jax.precision import at_least_f32

HIGHEST = jax.lax.Precision.HIGHEST
NORM_CLAMP = 2.0**-24  # keeps x / |x| finite for (near-)zero features, e.g. padding nodes


class NormSE3(nn.Module):
    """Per degree: ``n = |x|`` over components, ``out = x / n * ReLU(LayerNorm_channels(n))``.

    Rotations change only the direction of each channel's vector, never ``n``, so the output
    is equivariant. Computed in (at least) float32.
    """

    fiber: Fiber

    @nn.compact
    def __call__(self, features: dict) -> dict:
        self.fiber.check_features(features, "NormSE3 input")
        out = {}
        with jax.named_scope("norm"):
            for d, _ in self.fiber:
                x = at_least_f32(features[d])
                # the component sums as einsums (float32 on every backend): as broadcasts and
                # sums, XLA's CPU compiler fused the backward pass into reductions 2x slower (the
                # trunk's training step 0.91). |x| clamped away from 0: finite gradients at 0.
                sq = jnp.einsum("ncm,ncm->nc", x, x, precision=HIGHEST)
                n = jnp.sqrt(jnp.maximum(sq, NORM_CLAMP**2))  # [N, C]
                new = nn.relu(layer_norm(self, name=f"layer_norm_{d}")(n))
                out[d] = jnp.einsum("ncm,nc->ncm", x, new / n, precision=HIGHEST)
        return out
