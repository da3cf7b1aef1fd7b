"""One call for the common case: ``outputs = trunk.apply(params, features, coordinates, mask)``
with the graph built inside (under ``jit``, fixed shapes), on top of the explicit graph API
(:class:`~se3jax.model.SE3Transformer` + :func:`~se3jax.edges.edge_inputs`).

Radius graphs come from :func:`se3jax.neighbours.build_radius_graph` (``O(N)``, paired edges:
vesin through a host callback on a CPU, the cell list on an accelerator), k-nearest-neighbour
graphs from :func:`se3jax.neighbours.build_knn_graph` (a k-d tree through a host callback on a
CPU, ``O(N log N)``; all pairs on an accelerator, ``O(N^2)``: fine up to a few thousand points). A graph
that overflowed its budget, or coincident points, make every output NaN: loud, never a
silently wrong answer (the graph is also sown as ``intermediates/graph`` for inspection:
``trunk.apply(params, ..., mutable="intermediates")``).

>>> import jax, jax.numpy as jnp
>>> from se3jax.fiber import Fiber
>>> from se3jax.initialisation import init_params
>>> points = jax.random.normal(jax.random.PRNGKey(0), (20, 3)) * 2
>>> features = {0: jnp.ones((20, 4, 1))}
>>> trunk = PointCloudTrunk(Fiber({0: 4}), Fiber.create(2, 8), Fiber({1: 1}), num_layers=1, num_heads=2,
...                         graph="knn", k=6)
>>> params = init_params(trunk, jax.random.PRNGKey(1), features, points)
>>> jax.jit(trunk.apply)(params, features, points)[1].shape  # one vector per point
(20, 1, 3)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Features, Fiber
from se3jax.model import SE3Transformer
from se3jax.neighbours import build_knn_graph, build_radius_graph
from se3jax.point_clouds import MIN_DISTANCE

GRAPHS = ("knn", "radius")


class PointCloudTrunk(nn.Module):
    """:class:`~se3jax.model.SE3Transformer` on a graph it builds from ``coordinates``.

    ``graph="knn"``: each point receives edges from its ``k`` nearest points. ``graph="radius"``:
    every pair closer than ``cutoff``, at most ``max_neighbours`` per point and ``max_edges`` in
    all (default: ``max_neighbours`` per point; ``bin_capacity`` points per cell-list bin; see
    :func:`~se3jax.neighbours.build_radius_graph`). ``builder``: where either graph is built
    (:func:`~se3jax.neighbours.resolve_builder`: ``auto``, ``host`` or ``device``).
    ``mask`` ``[N]`` marks real points (padding gets no edges and no influence); ``segment_ids``
    ``[N]`` keeps several clouds of one padded batch apart. The execution's ``paired_edges`` is
    set to match the graph (radius graphs are paired, k-NN graphs directed).
    """

    fiber_in: Fiber
    fiber_hidden: Fiber
    fiber_out: Fiber
    num_layers: int
    num_heads: int = 8
    channels_div: int = 2
    graph: str = "knn"
    k: int = 16
    cutoff: float = 0.0
    max_neighbours: int = 32
    bin_capacity: int | None = None
    builder: str = "auto"
    max_edges: int | None = None
    execution: Execution = Execution()

    def build_graph(self, coordinates, mask=None, segment_ids=None):
        """The fixed-shape graph of ``coordinates`` (a :class:`~se3jax.point_clouds.PointCloudGraph`)."""
        if self.graph == "knn":
            return build_knn_graph(coordinates, self.k, mask=mask, segment_ids=segment_ids, builder=self.builder)
        if self.graph == "radius":
            if self.cutoff <= 0:
                raise ValueError(f"a radius graph needs cutoff > 0, got {self.cutoff}")
            return build_radius_graph(
                coordinates, self.cutoff, self.max_neighbours, mask=mask, segment_ids=segment_ids,
                bin_capacity=self.bin_capacity, builder=self.builder, max_edges=self.max_edges,
            )  # fmt: skip
        raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")

    @nn.compact
    def __call__(
        self, features: Features, coordinates: jax.Array, mask: jax.Array | None = None, segment_ids=None
    ) -> Features:
        graph = self.build_graph(jax.lax.stop_gradient(coordinates), mask, segment_ids)
        self.sow("intermediates", "graph", graph)
        max_degree = max(self.fiber_in.max_degree, self.fiber_hidden.max_degree, self.fiber_out.max_degree)
        edges = edge_inputs(coordinates, graph.senders, graph.receivers, max_degree, mask=graph.mask)
        execution = dataclasses.replace(self.execution, paired_edges=self.graph == "radius")
        out = SE3Transformer(
            self.fiber_in, self.fiber_hidden, self.fiber_out, self.num_layers, self.num_heads, self.channels_div,
            execution=execution, name="trunk",
        )(features, edges)  # fmt: skip
        broken = (graph.overflow > 0) | (graph.closest < MIN_DISTANCE)
        return {d: jnp.where(broken, jnp.nan, x) for d, x in out.items()}
