"""SE(3)-equivariant multi-head graph attention with fused keys and values."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from se3jax.edges import EdgeInputs
from se3jax.execution import Execution
from se3jax.fiber import Features, Fiber
from se3jax.layers.convolution import ConvSE3
from se3jax.layers.linear import LinearSE3
from se3jax.precision import at_least_f32, get_policy


def segment_softmax(logits: jax.Array, segments: jax.Array, num_segments: int, mask: jax.Array) -> jax.Array:
    """Softmax of ``logits [E, H]`` over the edges of each segment (destination node), in
    (at least) float32. Masked (padding) edges get weight 0 and no gradient; a segment with no real
    edge gets no weight at all (no NaN).

    >>> w = segment_softmax(jnp.array([[0.0], [0.0], [5.0]]), jnp.array([0, 0, 1]), 2,
    ...                     jnp.array([True, True, False]))
    >>> w[:, 0].tolist()
    [0.5, 0.5, 0.0]
    """
    logits = jnp.where(mask[:, None], at_least_f32(logits), -1e30)
    # The shift leaves the softmax unchanged: no gradient needs to flow through the max.
    shift = jax.lax.stop_gradient(jax.ops.segment_max(logits, segments, num_segments))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    ex = jnp.where(mask[:, None], jnp.exp(logits - shift[segments]), 0.0)
    denom = jax.ops.segment_sum(ex, segments, num_segments)
    return ex / jnp.where(denom > 0, denom, 1.0)[segments]


def split_heads(features: Features, num_heads: int) -> jax.Array:
    """``{d: [X, C_d, 2d+1]}`` -> ``[X, H, sum_d (C_d / H)(2d+1)]``: each head gets whole
    channels of every degree, so a per-head dot product stays rotation invariant."""
    parts = []
    for d in sorted(features):
        x = features[d]
        c = x.shape[1]
        if c % num_heads:
            raise ValueError(f"degree {d} has {c} channels, not divisible by {num_heads} heads")
        parts.append(x.reshape(x.shape[0], num_heads, (c // num_heads) * x.shape[2]))
    return jnp.concatenate(parts, axis=-1)


def merge_heads(heads: jax.Array, fiber: Fiber) -> Features:
    """The inverse of :func:`split_heads` for features of ``fiber``.

    >>> x = {0: jnp.arange(8.0).reshape(2, 4, 1), 1: jnp.arange(24.0).reshape(2, 4, 3)}
    >>> y = merge_heads(split_heads(x, 2), Fiber({0: 4, 1: 4}))
    >>> all(bool((y[d] == x[d]).all()) for d in x)
    True
    """
    num_heads, out, start = heads.shape[1], {}, 0
    for d, c in fiber:
        size = (c // num_heads) * (2 * d + 1)
        out[d] = heads[:, :, start : start + size].reshape(heads.shape[0], c, 2 * d + 1)
        start += size
    return out


class AttentionBlockSE3(nn.Module):
    """Attention block: queries from a per-degree linear map of the node features; keys and
    values from ONE TFN convolution whose output fiber is ``value_fiber + key_fiber``
    (split afterwards); per-head dot-product attention over each node's incoming edges;
    output concatenated with the block input per degree and projected to ``fiber_out``.
    """

    fiber_in: Fiber
    fiber_out: Fiber
    num_heads: int = 8
    channels_div: int = 2
    execution: Execution = Execution()

    def fibers(self):
        value_fiber = self.fiber_out // self.channels_div
        key_fiber = value_fiber.restrict(self.fiber_in.degrees)  # queries need input degrees
        return value_fiber, key_fiber

    @nn.compact
    def __call__(self, features: Features, edges: EdgeInputs) -> Features:
        value_fiber, key_fiber = self.fibers()
        kv = ConvSE3(
            self.fiber_in,
            value_fiber + key_fiber,
            return_messages=True,
            execution=self.execution,
            name="key_value_conv",
        )(features, edges)
        values = {d: kv[d][:, : value_fiber[d]] for d in value_fiber.degrees}  # [E, C_d, 2d+1]
        keys = {d: kv[d][:, value_fiber[d] :] for d in key_fiber.degrees}
        queries = LinearSE3(self.fiber_in, key_fiber, execution=self.execution, name="query")(features)

        policy = get_policy(self.execution.precision)
        num_nodes = next(iter(features.values())).shape[0]
        with jax.named_scope("attention"):
            k = split_heads(keys, self.num_heads)  # [E, H, c]
            q = split_heads(queries, self.num_heads)[edges.receivers]  # [E, H, c]
            logits = policy.einsum("ehc,ehc->eh", k, q) / jnp.sqrt(float(key_fiber.num_features))
            alpha = segment_softmax(logits, edges.receivers, num_nodes, edges.mask)  # [E, H]
            # all degrees' values weighted and summed at once: per degree, the weights'
            # gradient was a sum over axes of 1-7 numbers, slow on a CPU (the trunk's training
            # step 4% slower)
            v = split_heads(values, self.num_heads)  # [E, H, c]
            attended = merge_heads(jax.ops.segment_sum(v * alpha[:, :, None], edges.receivers, num_nodes), value_fiber)

        skip = self.fiber_in.restrict(value_fiber.degrees)
        z = {
            d: jnp.concatenate([attended[d], at_least_f32(features[d])], axis=1) if d in skip else attended[d]
            for d in value_fiber.degrees
        }
        return LinearSE3(value_fiber + skip, self.fiber_out, execution=self.execution, name="project")(z)
