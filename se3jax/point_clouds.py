"""Graphs from point clouds, with fixed shapes for ``jit``: radius graphs and k-nearest-neighbour
graphs over padded point sets, as edge lists padded to a budget with a mask.

Both build the all-pairs distance matrix: ``O(N^2)`` time and memory per call (16 MB of
float32 at 2,000 points, 1 GB at 16,000). That is fine up to a few thousand points per call;
beyond, and for periodic cells, use :mod:`se3jax.neighbours` (cell lists under ``jit``, ``O(N)``,
and a host path), which returns the same :class:`PointCloudGraph`.

Radius graphs are symmetric and come out *paired* (edges 2k and 2k+1 are the two directions of
one pair, what ``Execution(paired_edges=True)`` expects); k-NN graphs are directed (neighbour ->
point) and need ``Execution(paired_edges=False)``.

>>> import jax.numpy as jnp
>>> points = jnp.array([[0.0, 0, 0], [1.0, 0, 0], [0, 1.5, 0], [9.0, 9, 9]])
>>> g = radius_graph(points, cutoff=1.6, max_neighbours=2)
>>> g.senders[g.mask].tolist(), g.receivers[g.mask].tolist(), int(g.overflow)
([0, 1, 0, 2], [1, 0, 2, 0], 0)
>>> k = knn_graph(points[:3], k=1)
>>> k.senders.tolist(), k.receivers.tolist()
([1, 0, 0], [0, 1, 2])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MIN_DISTANCE = 1e-3  # points closer than this are coincident: an error, never a zero-length edge


class PointCloudGraph(NamedTuple):
    """A fixed-shape edge list: ``senders[e] -> receivers[e]`` where ``mask[e]``."""

    senders: jax.Array  # [E] int32
    receivers: jax.Array  # [E] int32
    mask: jax.Array  # [E] bool: real edges
    overflow: jax.Array  # [] int32: edges that did not fit the budget (0 unless truncated)
    closest: jax.Array  # [] float: the smallest distance between two real points
    # [E, 3] int32 periodic image of each edge's receiver, in cell vectors: the edge vector is
    # positions[receivers] - positions[senders] + shifts @ cell (None: an open system)
    shifts: jax.Array | None = None


def _distances(points: jax.Array, valid: jax.Array, segment_ids: jax.Array | None):
    n = points.shape[0]
    diff = points[:, None, :] - points[None, :, :]
    dist = jnp.sqrt(jnp.maximum(jnp.sum(diff * diff, axis=-1), 0.0))  # [N, N]
    allowed = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
    if segment_ids is not None:  # several graphs in one padded batch: no edges between them
        allowed &= segment_ids[:, None] == segment_ids[None, :]
    return dist, allowed


def radius_graph(
    points: jax.Array,
    cutoff: float,
    max_neighbours: int,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> PointCloudGraph:
    """Every pair of real points closer than ``cutoff``, both directions adjacent, padded to
    ``N * max_neighbours`` edges. ``overflow`` counts the edges a node beyond ``max_neighbours``
    neighbours would need: :func:`check_graph` raises on it (never a silent truncation).
    ``mask`` marks real points ``[N]``; ``segment_ids`` ``[N]`` keeps graphs of a batch apart."""
    points = jnp.asarray(points)
    n = points.shape[0]
    valid = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    dist, allowed = _distances(points, valid, segment_ids)
    within = allowed & (dist < cutoff)
    degree = jnp.sum(within, axis=1)
    upper = within & (jnp.arange(n)[:, None] < jnp.arange(n)[None, :])
    budget_pairs = n * max_neighbours // 2
    i, j = jnp.nonzero(upper, size=budget_pairs, fill_value=0)
    num_pairs = jnp.minimum(jnp.sum(upper), budget_pairs)
    real = jnp.arange(budget_pairs) < num_pairs
    senders = jnp.stack([i, j], axis=1).reshape(-1).astype(jnp.int32)
    receivers = jnp.stack([j, i], axis=1).reshape(-1).astype(jnp.int32)
    overflow = jnp.sum(jnp.maximum(degree - max_neighbours, 0)) + 2 * (jnp.sum(upper) - num_pairs)
    closest = jnp.min(jnp.where(allowed, dist, jnp.inf))
    return PointCloudGraph(senders, receivers, jnp.repeat(real, 2), overflow.astype(jnp.int32), closest)


def knn_graph(
    points: jax.Array, k: int, mask: jax.Array | None = None, segment_ids: jax.Array | None = None
) -> PointCloudGraph:
    """Each real point receives edges from its ``k`` nearest real points (``[N * k]`` edges,
    point ``p``'s in rows ``p*k .. p*k+k-1``); a point with fewer than ``k`` others in its
    graph gets only those (the rest masked)."""
    points = jnp.asarray(points)
    n = points.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    valid = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    dist, allowed = _distances(points, valid, segment_ids)
    neg, neighbours = jax.lax.top_k(jnp.where(allowed, -dist, -jnp.inf), k)  # [N, k] nearest first
    real = jnp.isfinite(neg) & valid[:, None]
    closest = jnp.min(jnp.where(allowed, dist, jnp.inf))
    return PointCloudGraph(
        neighbours.reshape(-1).astype(jnp.int32),
        jnp.repeat(jnp.arange(n, dtype=jnp.int32), k),
        real.reshape(-1),
        jnp.zeros((), jnp.int32),
        closest,
    )


def check_graph(graph: PointCloudGraph, points=None, mask=None, min_distance: float = MIN_DISTANCE) -> None:
    """On the host: raise a ``ValueError`` if the budget overflowed or two real points are
    (nearly) coincident, naming them (given ``points`` and their ``mask``). Inside ``jit``
    read ``graph.overflow`` and ``graph.closest`` instead (or call this on the outputs)."""
    if int(graph.overflow):
        raise ValueError(
            f"the neighbour budget overflowed by {int(graph.overflow)} edges: raise "
            f"max_neighbours (or bin_capacity for a cell list; or the cutoff is too large for "
            f"this point density)"
        )
    if float(graph.closest) < min_distance:
        pairs = ""
        if points is not None:
            p = np.asarray(points, np.float64)
            real = np.ones(len(p), bool) if mask is None else np.asarray(mask, bool)
            d = np.linalg.norm(p[:, None] - p[None], axis=-1)
            d[~(real[:, None] & real[None, :]) | np.eye(len(p), dtype=bool)] = np.inf
            i, j = np.unravel_index(np.argmin(d), d.shape)
            pairs = f": points {min(i, j)} and {max(i, j)} are {d[i, j]:.2e} apart"
        raise ValueError(
            f"coincident points (closer than {min_distance}){pairs}; their direction is "
            f"undefined, so no equivariant model can use them"
        )
