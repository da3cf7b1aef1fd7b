"""Padded ``jraph.GraphsTuple`` batches: the one input format of every model in se3jax.

Conventions (shared by the data pipeline, the model and inference):

- ``graphs.nodes = {"positions": [N, 3] float, "features": [N, F_node] float}``
- ``graphs.edges = {"features": [E, F_edge] float}``, optionally with ``"harmonics":
  [E, (2L+1)^2]`` precomputed stacked spherical harmonics of the edge directions (basis
  precomputation; otherwise the model computes them from positions, with gradients).
- edge ``e`` goes ``senders[e] -> receivers[e]``; its relative position is
  ``positions[receivers[e]] - positions[senders[e]]`` (destination minus source).
- ``graphs.globals`` is ``None`` or a dict of ``[G, ...]`` arrays (e.g. ``{"target": [G]}``).
- Batches are padded with :func:`pad_to_budget` to a fixed :class:`PaddingBudget`, so every
  batch of a run has the same shapes and the model compiles once. The last graphs are padding
  (jraph's convention); :func:`padding_masks` gives the masks that every reduction applies.

>>> import numpy as np
>>> g = molecule_graph(np.zeros((2, 3)), np.ones((2, 6)), senders=[0, 1], receivers=[1, 0],
...                   edge_features=np.eye(4)[[0, 0]])
>>> padded = pad_to_budget(g, PaddingBudget(n_node=4, n_edge=4, n_graph=2))
>>> [m.tolist() for m in padding_masks(padded)]
[[True, True, False, False], [True, True, False, False], [True, False]]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np

# dict keys of graphs.nodes / graphs.edges / graphs.globals
POSITIONS = "positions"
FEATURES = "features"
HARMONICS = "harmonics"
TARGET = "target"
MIN_EDGE_LENGTH = 1e-3  # a real edge shorter than this joins (nearly) coincident points: an error


@dataclasses.dataclass(frozen=True)
class PaddingBudget:
    """Fixed sizes a batch is padded to. ``n_graph`` counts the padding graph too."""

    n_node: int
    n_edge: int
    n_graph: int

    def __post_init__(self):
        if self.n_node < 2 or self.n_edge < 1 or self.n_graph < 2:
            raise ValueError(f"PaddingBudget needs n_node >= 2, n_edge >= 1, n_graph >= 2: {self}")

    @classmethod
    def for_batch(
        cls, batch_size: int, mean_nodes: float, mean_edges: float, max_nodes: int, max_edges: int, slack: float = 1.1
    ) -> PaddingBudget:
        """A budget that holds ``batch_size`` typical molecules (plus ``slack``) and always
        at least one of the largest, rounded up to multiples of 64 for friendlier shapes."""

        def round_up(x: float) -> int:
            return int(math.ceil(x / 64.0) * 64)

        n_node = round_up(max(batch_size * mean_nodes * slack, max_nodes) + 1)
        n_edge = round_up(max(batch_size * mean_edges * slack, max_edges) + 1)
        return cls(n_node=n_node, n_edge=n_edge, n_graph=batch_size + 1)

    def fits(self, n_node: int, n_edge: int, n_graph: int) -> bool:
        """Whether real sizes fit: the padding graph needs one node and one graph slot."""
        return n_node < self.n_node and n_edge <= self.n_edge and n_graph < self.n_graph


def graphs_tuple(
    positions, node_features, edge_features, senders, receivers, n_node, n_edge, globals_: dict | None = None
) -> jraph.GraphsTuple:
    """The GraphsTuple of these arrays in se3jax's layout (the dict keys above): the one place
    the layout is spelled. Arrays are taken as they are (numpy or traced)."""
    return jraph.GraphsTuple(
        nodes={POSITIONS: positions, FEATURES: node_features},
        edges={FEATURES: edge_features},
        senders=senders,
        receivers=receivers,
        n_node=n_node,
        n_edge=n_edge,
        globals=globals_,
    )


def molecule_graph(
    positions, node_features, senders, receivers, edge_features, globals_: dict | None = None
) -> jraph.GraphsTuple:
    """One unpadded molecule as a GraphsTuple of numpy arrays (float32 / int32)."""
    positions = np.asarray(positions, np.float32).reshape(-1, 3)
    node_features = np.asarray(node_features, np.float32)
    senders = np.asarray(senders, np.int32).reshape(-1)
    receivers = np.asarray(receivers, np.int32).reshape(-1)
    edge_features = np.asarray(edge_features, np.float32)
    if edge_features.ndim != 2 or edge_features.shape[0] != len(senders):
        raise ValueError(f"edge features must be [E={len(senders)}, F], got {edge_features.shape}")
    return graphs_tuple(
        positions,
        node_features,
        edge_features,
        senders,
        receivers,
        n_node=np.array([len(positions)], np.int32),
        n_edge=np.array([len(senders)], np.int32),
        globals_=None if globals_ is None else {k: np.asarray(v)[None] for k, v in globals_.items()},
    )


def pad_to_budget(graphs: jraph.GraphsTuple | Sequence[jraph.GraphsTuple], budget: PaddingBudget) -> jraph.GraphsTuple:
    """Batch (if given a list) and pad to ``budget``; a clear error if it does not fit.

    Returns numpy arrays in the model's dtypes: floats as float32, indices and counts as
    int32 (jraph's padding widens them).
    """
    if not isinstance(graphs, jraph.GraphsTuple):
        graphs = list(graphs)
        if not graphs:
            raise ValueError("pad_to_budget got an empty list of graphs")
        graphs = jraph.batch_np(graphs)
    n_node, n_edge, n_graph = (int(np.sum(graphs.n_node)), int(np.sum(graphs.n_edge)), len(graphs.n_node))
    if not budget.fits(n_node, n_edge, n_graph):
        raise ValueError(
            f"batch of {n_graph} graphs with {n_node} nodes and {n_edge} edges does not fit the "
            f"padding budget {budget} (one node and one graph are reserved for padding)"
        )
    padded = jraph.pad_with_graphs(graphs, budget.n_node, budget.n_edge, budget.n_graph)
    return jax.tree.map(lambda x: np.asarray(x, np.float32 if np.asarray(x).dtype.kind == "f" else np.int32), padded)


class PaddingMasks(NamedTuple):
    """True for real entries, False for padding."""

    nodes: jax.Array  # [N] bool
    edges: jax.Array  # [E] bool
    graphs: jax.Array  # [G] bool


def padding_masks(graphs: jraph.GraphsTuple) -> PaddingMasks:
    """Boolean masks of real nodes, edges and graphs. jit-safe; numpy masks for a batch of
    numpy counts (the host's checks of every batch then compile nothing).

    jraph's convention: the first padding graph holds every padding node and edge (and at
    least one node); any further padding graphs are empty and trail it.
    """
    xp = np if isinstance(graphs.n_node, np.ndarray) and isinstance(graphs.n_edge, np.ndarray) else jnp
    n_node, n_edge = xp.asarray(graphs.n_node), xp.asarray(graphs.n_edge)
    num_graphs = n_node.shape[0]
    num_padding_graphs = xp.argmin(n_node[::-1] == 0) + 1
    graph_mask = xp.arange(num_graphs) < num_graphs - num_padding_graphs
    real_nodes = xp.sum(xp.where(graph_mask, n_node, 0))
    real_edges = xp.sum(xp.where(graph_mask, n_edge, 0))
    node_mask = xp.arange(graphs.nodes[POSITIONS].shape[0]) < real_nodes
    edge_mask = xp.arange(graphs.senders.shape[0]) < real_edges
    return PaddingMasks(node_mask, edge_mask, graph_mask)


def node_graph_index(graphs: jraph.GraphsTuple) -> jax.Array:
    """For every node, the index of its graph ([N] int32). jit-safe."""
    n_total = graphs.nodes[POSITIONS].shape[0]
    return jnp.repeat(jnp.arange(graphs.n_node.shape[0]), jnp.asarray(graphs.n_node), total_repeat_length=n_total)


def edges_are_paired(graphs: jraph.GraphsTuple) -> jax.Array:
    """Whether edges ``2k`` and ``2k+1`` are the two directions of one bond with the same
    features, for every ``k`` (padding edges, all self-loops on one padding node, qualify).
    A scalar bool; jit-safe."""
    s, r = jnp.asarray(graphs.senders), jnp.asarray(graphs.receivers)
    if s.shape[0] % 2:
        return jnp.array(False)
    f = jnp.asarray(graphs.edges[FEATURES])
    return jnp.all(s[0::2] == r[1::2]) & jnp.all(r[0::2] == s[1::2]) & jnp.all(f[0::2] == f[1::2])


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_graphs(graphs, node_features_dim: int, edge_features_dim: int, paired_edges: bool = True) -> None:
    """Check a model input and raise a ``ValueError`` that names the problem.

    Shape and dtype checks always run (shapes are static under ``jit``); value checks
    (:func:`check_values`: non-finite positions, out-of-range edge indices, node counts, edge
    pairing) run when the arrays are concrete, i.e. outside ``jit``. Under ``jit`` they cannot:
    the loader and the predictor check every batch on the host instead, and a paired model
    traced with unpaired edges outputs NaN rather than wrong numbers.
    """
    if not isinstance(graphs, jraph.GraphsTuple):
        raise ValueError(f"expected a jraph.GraphsTuple, got {type(graphs).__name__}")
    if not isinstance(graphs.nodes, dict) or POSITIONS not in graphs.nodes or FEATURES not in graphs.nodes:
        raise ValueError("graphs.nodes must be a dict with 'positions' [N, 3] and 'features' [N, F]")
    if not isinstance(graphs.edges, dict) or FEATURES not in graphs.edges:
        raise ValueError("graphs.edges must be a dict with 'features' [E, F]")
    pos, feat, efeat = graphs.nodes[POSITIONS], graphs.nodes[FEATURES], graphs.edges[FEATURES]
    n, e = pos.shape[0], graphs.senders.shape[0]
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {tuple(pos.shape)}")
    if feat.shape != (n, node_features_dim):
        raise ValueError(
            f"node features must have shape [N={n}, {node_features_dim}] for this model, got {tuple(feat.shape)}"
        )
    if efeat.shape != (e, edge_features_dim):
        raise ValueError(
            f"edge features must have shape [E={e}, {edge_features_dim}] for this model, got {tuple(efeat.shape)}"
        )
    if graphs.receivers.shape != (e,):
        raise ValueError(
            f"senders {tuple(graphs.senders.shape)} and receivers "
            f"{tuple(graphs.receivers.shape)} must both have shape [E]"
        )
    for name, arr in ((POSITIONS, pos), ("node features", feat), ("edge features", efeat)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {arr.dtype}")
    for name, arr in (
        ("senders", graphs.senders),
        ("receivers", graphs.receivers),
        ("n_node", graphs.n_node),
        ("n_edge", graphs.n_edge),
    ):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {arr.dtype}")
    if paired_edges and graphs.senders.shape[0] % 2:
        raise ValueError(f"paired edges need an even number of edges, got {graphs.senders.shape[0]}")
    if graphs.n_node.shape != graphs.n_edge.shape or graphs.n_node.ndim != 1:
        raise ValueError("n_node and n_edge must both have shape [G]")
    if n == 0 or graphs.n_node.shape[0] == 0:
        raise ValueError("empty graph batch: no nodes or no graphs")

    leaves = (pos, feat, efeat, graphs.senders, graphs.receivers, graphs.n_node, graphs.n_edge)
    if all(_is_concrete(x) for x in leaves):
        check_values(graphs, paired_edges)


def check_paired_edges(graphs: jraph.GraphsTuple) -> None:
    """Raise a ``ValueError`` naming the first pair of edges ``2k, 2k+1`` that is not one bond's
    two directions with equal features (host arrays). A compiled model cannot raise: with
    unpaired edges it would output NaN, so every host entry point (the batch loader, the
    predictor) calls this first.

    >>> g = molecule_graph(np.eye(3), np.ones((3, 6)), [0, 1, 1, 2], [1, 0, 2, 1], np.ones((4, 4)))
    >>> check_paired_edges(g)  # 0->1, 1->0, 1->2, 2->1: paired
    >>> check_paired_edges(g._replace(receivers=np.array([1, 0, 2, 0])))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: the model expects paired edges (...), but edges 2 and 3 are 1->2 and 2->0; build...
    """
    senders, receivers = np.asarray(graphs.senders), np.asarray(graphs.receivers)
    features = np.asarray(graphs.edges[FEATURES])
    hint = "build graphs with se3jax.data.molecule_to_graph or run the model with Execution(paired_edges=False)"
    prefix = (
        "the model expects paired edges (edges 2k and 2k+1 are the two directions of one bond, with equal features)"
    )
    if len(senders) % 2:
        raise ValueError(f"{prefix}, but there is an odd number of edges ({len(senders)}); {hint}")
    broken = (
        (senders[0::2] != receivers[1::2])
        | (receivers[0::2] != senders[1::2])
        | np.any(features[0::2] != features[1::2], axis=tuple(range(1, features.ndim)))
    )
    if broken.any():
        a = 2 * int(np.argmax(broken))
        raise ValueError(
            f"{prefix}, but edges {a} and {a + 1} are {senders[a]}->{receivers[a]} and "
            f"{senders[a + 1]}->{receivers[a + 1]}"
            + ("" if features[a].tolist() == features[a + 1].tolist() else " with different features")
            + f"; {hint}"
        )


def check_values(graphs: jraph.GraphsTuple, paired_edges: bool = True) -> None:
    """The value checks of :func:`validate_graphs`, in numpy on the host: finite positions and
    features, consistent counts, edge indices in range, and (if asked) paired edges. Under
    ``jit`` values cannot be checked, so the host paths (the batch loader, the predictor) call
    this before a batch reaches a compiled step."""
    pos = np.asarray(graphs.nodes[POSITIONS])
    n, e = pos.shape[0], np.shape(graphs.senders)[0]
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        raise ValueError(f"positions of node(s) {np.flatnonzero(bad)[:10].tolist()} are NaN or infinite")
    if not (
        np.isfinite(np.asarray(graphs.nodes[FEATURES])).all() and np.isfinite(np.asarray(graphs.edges[FEATURES])).all()
    ):
        raise ValueError("node or edge features contain NaN or infinite values")
    if int(np.sum(graphs.n_node)) != n or int(np.sum(graphs.n_edge)) != e:
        raise ValueError(
            f"n_node sums to {int(np.sum(graphs.n_node))} and n_edge to "
            f"{int(np.sum(graphs.n_edge))}, but there are {n} nodes and {e} edges"
        )
    senders, receivers = np.asarray(graphs.senders), np.asarray(graphs.receivers)
    for name, idx in (("senders", senders), ("receivers", receivers)):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{name} index out of range [0, {n}): min {idx.min()}, max {idx.max()}")
    if paired_edges:
        check_paired_edges(graphs)
    with jax.ensure_compile_time_eval():  # concrete masks also while a jit traces around them
        real_edges = np.asarray(padding_masks(graphs).edges)
    lengths = np.linalg.norm(pos[receivers] - pos[senders], axis=-1)
    short = np.flatnonzero(real_edges & (lengths < MIN_EDGE_LENGTH))
    if short.size:
        e = int(short[0])
        raise ValueError(
            f"edge {e} joins nodes {int(senders[e])} and {int(receivers[e])}, which are "
            f"{lengths[e]:.2e} apart: coincident points have no direction (need at least "
            f"{MIN_EDGE_LENGTH})"
        )
