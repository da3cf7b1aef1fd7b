"""SE(3)-Transformer models: the equivariant trunk and the pooled QM9 property predictor."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from se3jax.edges import EdgeInputs, edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Features, Fiber
from se3jax.graphs import (
    FEATURES,
    HARMONICS,
    POSITIONS,
    edges_are_paired,
    node_graph_index,
    padding_masks,
    validate_graphs,
)
from se3jax.layers.attention import AttentionBlockSE3
from se3jax.layers.convolution import ConvSE3
from se3jax.layers.norm import NormSE3
from se3jax.layers.pooling import pool_nodes
from se3jax.layers.radial import torch_dense
from se3jax.precision import at_least_f32, get_policy


class SE3Transformer(nn.Module):
    """The equivariant trunk, for use inside other models: ``num_layers`` x [AttentionBlockSE3
    -> NormSE3], then a TFN convolution with self-interaction to ``fiber_out``.

    Inputs: node features as a dict of degrees ``{d: [N, C_d, 2d+1]}`` with any degrees (scalars
    plus vectors, say) and the graph's :class:`~se3jax.edges.EdgeInputs` from
    :func:`~se3jax.edges.edge_inputs` (positions, edge list, optional edge scalar features and
    padding mask; its ``max_degree`` must cover every fiber's degrees). Output: the degrees of
    ``fiber_out`` (degree-1 displacements, degree-2 tensors, ...). Degree-0 outputs are
    invariant under rotations of the positions, degree-d outputs rotate with the Wigner-D
    matrix of degree d (e3nn's real basis: degree 1 is (x, y, z)). A pure Flax module: use it
    under ``jit``, ``vmap``, ``grad`` and ``nn.remat`` like any other.

    >>> import jax, jax.numpy as jnp
    >>> from se3jax.edges import edge_inputs
    >>> from se3jax.initialisation import init_params
    >>> from se3jax.point_clouds import radius_graph
    >>> points = jax.random.normal(jax.random.PRNGKey(0), (12, 3)) * 2
    >>> graph = radius_graph(points, cutoff=3.0, max_neighbours=11)
    >>> edges = edge_inputs(points, graph.senders, graph.receivers, max_degree=1, mask=graph.mask)
    >>> features = {0: jnp.ones((12, 4, 1)), 1: jnp.zeros((12, 1, 3))}  # scalars and a vector
    >>> trunk = SE3Transformer(Fiber({0: 4, 1: 1}), Fiber.create(2, 8), Fiber({1: 1}), num_layers=2,
    ...                        num_heads=2)
    >>> params = init_params(trunk, jax.random.PRNGKey(1), features, edges)
    >>> jax.jit(trunk.apply)(params, features, edges)[1].shape  # one vector per point
    (12, 1, 3)
    """

    fiber_in: Fiber
    fiber_hidden: Fiber
    fiber_out: Fiber
    num_layers: int
    num_heads: int = 8
    channels_div: int = 2
    self_interaction: str = "per_edge"  # in the output convolution; see ConvSE3
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, features: Features, edges: EdgeInputs) -> Features:
        # Low-memory: also recompute each whole block in the backward pass (only block
        # inputs are kept).
        block_cls = nn.remat(AttentionBlockSE3) if self.execution.low_memory else AttentionBlockSE3
        fiber = self.fiber_in
        for i in range(self.num_layers):
            features = block_cls(
                fiber,
                self.fiber_hidden,
                self.num_heads,
                self.channels_div,
                execution=self.execution,
                name=f"attention_{i}",
            )(features, edges)
            features = NormSE3(self.fiber_hidden, name=f"norm_{i}")(features)
            fiber = self.fiber_hidden
        return ConvSE3(
            fiber, self.fiber_out, self_interaction=self.self_interaction, execution=self.execution, name="output_conv"
        )(features, edges)


class SE3TransformerPooled(nn.Module):
    """Graph-level property predictor (the QM9 network; see the README's Design section).

    Input: a padded ``jraph.GraphsTuple`` (see :mod:`se3jax.graphs`). Output: ``[G]``
    predictions, one per graph (padding graphs give an unused value).
    """

    node_features_dim: int = 6
    edge_features_dim: int = 4
    num_layers: int = 7
    num_degrees: int = 4
    num_channels: int = 32
    num_heads: int = 8
    channels_div: int = 2
    pooling: str = "max"
    mlp_dim: int = 128
    self_interaction: str = "per_edge"
    execution: Execution = Execution()

    def trunk(self) -> SE3Transformer:
        """The trunk with this model's fibers; every setting the two classes share (layers,
        heads, channels_div, self-interaction, execution) is passed on by name."""
        shared = {name: getattr(self, name) for name in _TRUNK_SETTINGS if name in _POOLED_FIELDS}
        return SE3Transformer(
            fiber_in=Fiber({0: self.node_features_dim}),
            fiber_hidden=Fiber.create(self.num_degrees, self.num_channels),
            fiber_out=Fiber({0: self.num_degrees * self.num_channels}),
            **shared,
            name="trunk",
        )

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple) -> jax.Array:
        paired = self.execution.paired_edges
        validate_graphs(graphs, self.node_features_dim, self.edge_features_dim, paired)
        masks = padding_masks(graphs)
        edges = edge_inputs(
            graphs.nodes[POSITIONS],
            graphs.senders,
            graphs.receivers,
            self.num_degrees - 1,
            graphs.edges[FEATURES],
            masks.edges,
            graphs.edges.get(HARMONICS),
        )
        features = {0: at_least_f32(graphs.nodes[FEATURES])[:, :, None]}
        out = self.trunk()(features, edges)
        num_graphs = graphs.n_node.shape[0]
        pooled = pool_nodes(out[0][..., 0], node_graph_index(graphs), masks.nodes, num_graphs, self.pooling)
        precision = get_policy(self.execution.precision).dot_precision
        h = nn.relu(torch_dense(self, self.mlp_dim, pooled.shape[-1], precision, name="mlp_hidden")(pooled))
        out = torch_dense(self, 1, self.mlp_dim, precision, name="mlp_out")(h)[:, 0]
        # The host entry points (batch loader, predictor) refuse unpaired edges with a clear
        # error (graphs.check_paired_edges); a user's own jit gets NaN, never wrong numbers.
        if paired:
            out = jnp.where(edges_are_paired(graphs), out, jnp.nan)
        return out


# The trunk's settings (its dataclass fields less the fibers and Flax's own); the pooled model
# forwards those it shares.
_TRUNK_SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(SE3Transformer)
    if f.name not in ("fiber_in", "fiber_hidden", "fiber_out", "parent", "name")
)
_POOLED_FIELDS = frozenset(f.name for f in dataclasses.fields(SE3TransformerPooled))
