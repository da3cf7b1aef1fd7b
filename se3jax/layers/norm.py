"""NormSE3: equivariant nonlinearity acting on the norms of each degree's features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from se3jax.fiber import Fiber
from se3jax.layers.radial import layer_norm
from se3jax.precision import at_least_f32

NORM_CLAMP = 2.0**-24  # keeps x / |x| finite for (near-)zero features, e.g. padding nodes


def safe_norm(x: jax.Array, axis: int = -1, clamp: float = NORM_CLAMP) -> jax.Array:
    """|x| over ``axis`` (keepdims), clamped away from 0 with finite gradients at 0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return jnp.sqrt(jnp.maximum(sq, clamp**2))


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
                n = safe_norm(x)  # [N, C, 1]
                new = nn.relu(layer_norm(self, name=f"layer_norm_{d}")(n[..., 0]))[..., None]
                out[d] = x * (new / n)
        return out
