"""Graph pooling of node features over each graph's real nodes (padding excluded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pool_nodes(x: jax.Array, node_graph: jax.Array, node_mask: jax.Array, num_graphs: int,
               mode: str = "max") -> jax.Array:
    """Pool ``x [N, ...]`` per graph into ``[G, ...]``; padding nodes are ignored.

    ``max``: maximum over the graph's nodes; ``mean``: average. A graph with no real node
    (padding graph) gets 0, never ``-inf`` or NaN.

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
    if mode == "mean":
        total = jax.ops.segment_sum(jnp.where(mask, x, 0.0), node_graph, num_graphs)
        return total / jnp.maximum(counts, 1.0).reshape(has_nodes.shape)
    raise ValueError(f"unknown pooling {mode!r}; choose 'max' or 'mean'")
