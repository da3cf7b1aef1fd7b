"""Per-edge inputs of the equivariant layers, computed once per forward pass.

:func:`edge_inputs` is the one recipe that turns positions and the edge list into what every
convolution reads: the radial networks' scalar inputs (edge features with the edge length
appended) and the stacked spherical harmonics of the edge directions (from which each layer
builds its kernel bases). The QM9 model, the trunk API, the tests and the benchmarks all use it.

>>> import jax.numpy as jnp
>>> e = edge_inputs(jnp.array([[0.0, 0, 0], [0, 0, 2.0]]), jnp.array([0, 1]), jnp.array([1, 0]),
...                 max_degree=1, edge_features=jnp.ones((2, 4)))
>>> e.scalars.shape, e.harmonics.shape, e.scalars[:, -1].tolist(), e.mask.tolist()
((2, 5), (2, 9), [2.0, 2.0], [True, True])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from se3jax.basis import harmonics_dim, safe_directions, stacked_harmonics
from se3jax.precision import at_least_f32


class EdgeInputs(NamedTuple):
    """What the layers read per edge ``e`` (``senders[e] -> receivers[e]``)."""

    senders: jax.Array  # [E] int
    receivers: jax.Array  # [E] int
    mask: jax.Array  # [E] bool: True for real edges, False for padding
    scalars: jax.Array  # [E, S] radial network input: edge features, then the edge length
    harmonics: jax.Array  # [E, (2 max_degree + 1)^2] spherical harmonics of orders 0..2 max_degree

    @property
    def max_degree(self) -> int:
        """The largest feature degree these harmonics serve (orders up to twice that)."""
        order = round(self.harmonics.shape[-1] ** 0.5) - 1
        return order // 2


def edge_inputs(
    positions: jax.Array,
    senders: jax.Array,
    receivers: jax.Array,
    max_degree: int,
    edge_features: jax.Array | None = None,
    mask: jax.Array | None = None,
    harmonics: jax.Array | None = None,
    shifts: jax.Array | None = None,
    cell: jax.Array | None = None,
) -> EdgeInputs:
    """The per-edge inputs for features of degrees up to ``max_degree``.

    The relative position of edge ``e`` is ``positions[receivers[e]] - positions[senders[e]]``
    (destination minus source), so everything is translation invariant. ``edge_features``
    ``[E, F]`` (optional) come first in the scalars, the length last. ``mask`` defaults to all
    edges real. ``harmonics``: precomputed stacked harmonics (basis precomputation; then no
    gradient flows to positions through the directions, only through the lengths).

    Periodic systems: ``shifts`` ``[E, 3]`` (integer images, e.g. from
    :mod:`se3jax.neighbours`) and ``cell`` ``[3, 3]`` (lattice vectors as rows) make the
    relative position ``positions[receivers] - positions[senders] + shifts @ cell``; gradients
    flow to the cell too (stress as the derivative with respect to a strain of the cell).
    """
    senders, receivers = jnp.asarray(senders), jnp.asarray(receivers)
    computed, lengths = edge_geometry(positions, senders, receivers, 2 * max_degree, shifts, cell)
    if harmonics is not None:
        expected = (senders.shape[0], harmonics_dim(2 * max_degree))
        if tuple(harmonics.shape) != expected:
            raise ValueError(
                f"precomputed edge harmonics have shape {tuple(harmonics.shape)}, "
                f"expected {list(expected)} for degrees up to {max_degree}"
            )
        computed = at_least_f32(harmonics)
    scalars = lengths[:, None]
    if edge_features is not None:
        edge_features = at_least_f32(edge_features)
        if edge_features.ndim != 2 or edge_features.shape[0] != senders.shape[0]:
            raise ValueError(f"edge features must be [E={senders.shape[0]}, F], got {tuple(edge_features.shape)}")
        scalars = jnp.concatenate([edge_features, scalars.astype(edge_features.dtype)], axis=-1)
    if mask is None:
        mask = jnp.ones(senders.shape[0], bool)
    return EdgeInputs(senders, receivers, jnp.asarray(mask), scalars, computed)


def edge_vectors(positions, senders, receivers, shifts=None, cell=None) -> jax.Array:
    """Relative positions ``[E, 3]``: destination minus source, plus the periodic image
    ``shifts @ cell`` when given (both or neither)."""
    positions = jnp.asarray(positions)  # a numpy array cannot be indexed by traced indices
    vectors = positions[receivers] - positions[senders]
    if (shifts is None) != (cell is None):
        raise ValueError("periodic edges need both shifts [E, 3] and the cell [3, 3] (or neither)")
    if shifts is not None:
        cell = jnp.asarray(cell)
        if cell.shape != (3, 3) or jnp.shape(shifts) != (senders.shape[0], 3):
            raise ValueError(
                f"shifts must be [E={senders.shape[0]}, 3] and cell [3, 3], got {tuple(jnp.shape(shifts))} "
                f"and {tuple(cell.shape)}"
            )
        # elementwise, not a matmul: exact whatever matmul precision a backend defaults to (TF32)
        vectors = vectors + jnp.sum(jnp.asarray(shifts).astype(cell.dtype)[:, :, None] * cell[None], axis=1)
    return vectors


def edge_geometry(positions, senders, receivers, max_order: int, shifts=None, cell=None):
    """Per-edge stacked harmonics ``[E, (max_order+1)^2]`` and lengths ``[E]`` (as
    :func:`se3jax.basis.edge_geometry`, with periodic images)."""
    unit, length, _ = safe_directions(edge_vectors(positions, senders, receivers, shifts, cell))
    return stacked_harmonics(unit, max_order), length
