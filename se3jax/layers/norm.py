"""NormSE3: equivariant nonlinearity acting on the norms of each degree's features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from se3jax.fiber import Fiber
from se3jax.layers.radial import layer_norm
from se3jax.precision import at_least_f32

# Norms are float32 under every precision policy (se3jax.precision): their component sums always
# ask for full float32 (named so a test can tell them from the policy's contractions).
NORM_SCOPE = "norm_se3"
NORM_PRECISION = jax.lax.Precision.HIGHEST
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
        with jax.named_scope(NORM_SCOPE):
            for d, _ in self.fiber:
                x = at_least_f32(features[d])
                # the component sums as einsums: as broadcasts and sums, XLA's CPU compiler fused
                # the backward pass into reductions 2x slower (the trunk's training step 0.91-0.95).
                # |x| clamped away from 0: finite gradients at 0.
                sq = jnp.einsum("ncm,ncm->nc", x, x, precision=NORM_PRECISION)
                n = jnp.sqrt(jnp.maximum(sq, NORM_CLAMP**2))  # [N, C]
                new = nn.relu(layer_norm(self, name=f"layer_norm_{d}")(n))
                out[d] = jnp.einsum("ncm,nc->ncm", x, new / n, precision=NORM_PRECISION)
        return out
