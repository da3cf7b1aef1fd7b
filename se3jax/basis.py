"""Equivariant kernel bases: spherical harmonics contracted with Clebsch–Gordan coefficients.

For an edge with direction ``r̂`` and a path ``(d_in, d_out)``, the basis is

    basis[e, m_in, f, m_out] = sum_mJ CG_J[m_in, m_out, mJ] * Y_J(r̂_e)[mJ],
    J = |d_in - d_out| + f,   f = 0 .. 2 min(d_in, d_out)

Every layout (one path, or several paths fused block-diagonally into one tensor) is a linear
function of the stacked harmonics ``Y[e, :]`` of all orders ``J <= 2 max_degree``, so each is a
single matmul ``Y @ Q`` with a constant ``Q`` built once in numpy from e3nn-jax's
Clebsch–Gordan numbers (up to degree 3 from a table shipped with the package). Only ``Y``
depends on positions, and it carries gradients, so forces (d output / d positions) are
available.

>>> import numpy as np
>>> num_frequencies(1, 2), harmonics_dim(6)
(3, 49)
>>> q = path_basis_matrix(1, 1)
>>> q.shape  # [sum_J (2J+1), (2*1+1) * 3 * (2*1+1)]
(9, 27)
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def num_frequencies(d_in: int, d_out: int) -> int:
    """Number of harmonic orders J coupling d_in and d_out: 2 min(d_in, d_out) + 1."""
    return 2 * min(d_in, d_out) + 1


def harmonics_dim(max_order: int) -> int:
    """Size of the stacked harmonics of orders 0..max_order: (max_order + 1)^2."""
    return (max_order + 1) ** 2


# e3nn-jax's coefficients for degrees <= 3 (scripts/clebsch_gordan_table.py): importing
# e3nn-jax takes 2.4 s (scipy.signal, sympy), more than half of a training run's imports
CLEBSCH_GORDAN_TABLE = Path(__file__).with_name("clebsch_gordan.npz")


def clebsch_gordan_table_triples(max_degree: int = 3, max_recursion_order: int = 7):
    """The table's ``(d_in, d_out, J)``: every coupling of degrees <= ``max_degree``, and the
    harmonics recursion's ``(l, 1, l + 1)`` for ``l <= max_recursion_order``."""
    triples = [
        (a, b, j) for a in range(max_degree + 1) for b in range(max_degree + 1) for j in range(abs(a - b), a + b + 1)
    ]
    return triples + [(l, 1, l + 1) for l in range(max_degree + 1, max_recursion_order + 1)]


@functools.cache
def _clebsch_gordan_table() -> dict[str, np.ndarray]:
    with np.load(CLEBSCH_GORDAN_TABLE) as table:
        arrays = {key: table[key] for key in table.files}
    for array in arrays.values():
        array.setflags(write=False)  # shared by every caller
    return arrays


@functools.cache
def clebsch_gordan(d_in: int, d_out: int, order: int) -> np.ndarray:
    """CG_J[m_in, m_out, mJ] in e3nn's real basis, float64: from the table, else from e3nn-jax."""
    table = _clebsch_gordan_table()
    key = f"{d_in}_{d_out}_{order}"
    if key in table:
        return table[key]
    cg = e3nn_clebsch_gordan(d_in, d_out, order)
    cg.setflags(write=False)  # cached: shared by every caller, as the table's arrays are
    return cg


def e3nn_clebsch_gordan(d_in: int, d_out: int, order: int) -> np.ndarray:
    """e3nn-jax's coefficients computed (it is imported here: for the table's script and for
    degrees beyond the table's), float64."""
    import e3nn_jax as e3nn

    return np.asarray(e3nn.clebsch_gordan(d_in, d_out, order), dtype=np.float64)


@functools.cache
def path_basis_matrix(d_in: int, d_out: int) -> np.ndarray:
    """Q of one path: ``Y[:, :(2 max(d)+1)^2] @ Q`` is basis ``[2d_in+1, F, 2d_out+1]`` flattened.

    Rows index the stacked harmonics (order J occupies rows J^2 .. (J+1)^2 - 1).
    """
    n_f = num_frequencies(d_in, d_out)
    q = np.zeros((harmonics_dim(d_in + d_out), 2 * d_in + 1, n_f, 2 * d_out + 1))
    for f in range(n_f):
        order = abs(d_in - d_out) + f
        cg = clebsch_gordan(d_in, d_out, order)  # [m_in, m_out, mJ]
        q[order**2 : (order + 1) ** 2, :, f, :] = np.transpose(cg, (2, 0, 1))
    q.setflags(write=False)
    return q.reshape(q.shape[0], -1)


def safe_directions(vectors: jax.Array, eps: float = 1e-12):
    """Unit vectors and lengths, with zero-length vectors (padding edges) mapped to a fixed
    direction and length 0 through a double ``where``, so no NaN appears in values or
    gradients. Returns ``(unit [E, 3], length [E], is_zero [E])``.
    """
    sq = jnp.sum(vectors * vectors, axis=-1)
    is_zero = sq <= eps
    safe_sq = jnp.where(is_zero, 1.0, sq)
    length = jnp.sqrt(safe_sq)
    fallback = jnp.zeros_like(vectors).at[..., 2].set(1.0)
    unit = jnp.where(is_zero[..., None], fallback, vectors / length[..., None])
    return unit, jnp.where(is_zero, 0.0, length), is_zero


# Geometry is exact under every precision policy: the harmonics' contractions always run at
# full float32 (named so a test can tell them from the policy's contractions).
HARMONICS_SCOPE = "spherical_harmonics"
HARMONICS_PRECISION = jax.lax.Precision.HIGHEST


@functools.cache
def _harmonics_recursion(max_order: int) -> tuple[np.ndarray, ...]:
    """Tensors ``T_J [2J+1, 3, 2J+3]`` with ``Y_{J+1}(r) = einsum(Y_J(r), r, T_J)`` for unit ``r``:
    e3nn's Clebsch-Gordan coefficients (l, 1 -> l+1) scaled so every Y_J has e3nn's
    'component' norm sqrt(2J+1) on the unit sphere (the projected product has a constant norm
    there, so one direction fixes the scale)."""
    direction = np.array([0.36, -0.48, 0.8])  # any unit vector
    y, steps = np.ones(1), []
    for order in range(max_order):
        cg = clebsch_gordan(order, 1, order + 1)
        raw = np.einsum("i,j,ijk->k", y, direction, cg)
        scale = np.sqrt(2 * order + 3) / np.linalg.norm(raw)
        steps.append(cg * scale)
        y = raw * scale
    return tuple(steps)


def stacked_harmonics(unit_vectors: jax.Array, max_order: int) -> jax.Array:
    """Real spherical harmonics Y_J(r̂) for J = 0..max_order, stacked: ``[E, (max_order+1)^2]``.

    e3nn-jax's real basis and 'integral' normalisation (the integral of Y_J^2 over the sphere
    is 1; Y_0 = 1/sqrt(4 pi)), as the reference's bases. Computed by the recursion
    Y_{J+1} ~ CG(J, 1, J+1) Y_J r̂ as dense contractions at full float32 precision whatever a
    backend's (or a user's global) matmul default: e3nn's own sparse, custom-JVP form gives the
    same numbers but takes ~17 s to trace and compile under a gradient with respect to
    positions at order 6 (every force), this one ~3 s.
    """
    dtype = unit_vectors.dtype
    with jax.named_scope(HARMONICS_SCOPE):
        y = jnp.ones(unit_vectors.shape[:-1] + (1,), dtype)
        stacked = [y]
        for step in _harmonics_recursion(max_order):
            y = jnp.einsum("...i,...j,ijk->...k", y, unit_vectors, step.astype(dtype), precision=HARMONICS_PRECISION)
            stacked.append(y)
        return jnp.concatenate(stacked, axis=-1) * (1.0 / np.sqrt(4 * np.pi)).astype(dtype)


def edge_geometry(positions: jax.Array, senders: jax.Array, receivers: jax.Array, max_order: int):
    """Per-edge harmonics ``[E, (max_order+1)^2]`` and lengths ``[E]`` from node positions.

    Relative position is destination minus source. Translation invariant by construction.
    """
    rel = positions[receivers] - positions[senders]
    unit, length, _ = safe_directions(rel)
    return stacked_harmonics(unit, max_order), length
