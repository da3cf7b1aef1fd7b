"""Graph pooling of node features over each graph's real nodes (padding excluded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("max", "mean", "sum", "softmax")
SMOOTH_POOLINGS = ("mean", "sum", "softmax")  # gradients continuous in the positions


def pool_nodes(
    x: jax.Array, node_graph: jax.Array, node_mask: jax.Array, num_graphs: int, mode: str = "max"
) -> jax.Array:
    """Pool ``x [N, ...]`` per graph into ``[G, ...]``; padding nodes are ignored.

    ``max``: maximum over the graph's nodes (its gradient jumps where the maximising node
    changes, e.g. between symmetry-equivalent atoms); ``softmax``: per channel the
    softmax-weighted mean, a smooth maximum; ``mean`` and ``sum``: averages and totals (sum for
    extensive targets such as energies). A graph with no real node (padding graph) gets 0,
    never ``-inf`` or NaN.

    >>> x = jnp.array([[1.0], [3.0], [5.0], [7.0]])
    >>> pool_nodes(x, jnp.array([0, 0, 1, 1]), jnp.array([True, True, True, False]), 3).tolist()
    [[3.0], [5.0], [0.0]]
    """
    mask = node_mask.reshape((-1,) + (1,) * (x.ndim - 1))
    counts = jax.ops.segment_sum(node_mask.astype(x.dtype), node_graph, num_graphs)
    has_nodes = (counts > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    if mode == "max":
        pooled = jax.ops.segment_max(jnp.where(mask, x, -jnp.inf), node_graph, num_graphs)
        return jnp.where(has_nodes, pooled, 0.0)
    if mode == "softmax":  # per channel, sum of x weighted by softmax(x): a smooth maximum
        shift = jax.lax.stop_gradient(jax.ops.segment_max(jnp.where(mask, x, -jnp.inf), node_graph, num_graphs))
        weights = jnp.where(mask, jnp.exp(x - jnp.where(has_nodes, shift, 0.0)[node_graph]), 0.0)
        denominator = jax.ops.segment_sum(weights, node_graph, num_graphs)
        pooled = jax.ops.segment_sum(weights * x, node_graph, num_graphs) / jnp.where(has_nodes, denominator, 1.0)
        return jnp.where(has_nodes, pooled, 0.0)
    total = jax.ops.segment_sum(jnp.where(mask, x, 0.0), node_graph, num_graphs)
    if mode == "sum":
        return total
    if mode == "mean":
        return total / jnp.maximum(counts, 1.0).reshape(has_nodes.shape)
    raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLINGS}")
