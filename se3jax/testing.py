"""Test and benchmark helpers: rotations, the one equivariance assertion, synthetic molecules.

>>> import jax
>>> rot = random_rotations(np.random.default_rng(0), 2)
>>> rot.shape, bool(np.allclose(rot[0] @ rot[0].T, np.eye(3), atol=1e-15))
((2, 3, 3), True)
>>> bool(np.allclose(wigner_d(1, rot[0]), rot[0], atol=1e-6))  # e3nn's l=1 basis is (x, y, z)
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from se3jax.data.qm9 import QM9_SIZES
from se3jax.graphs import TARGET, PaddingBudget, molecule_graph, pad_to_budget


def random_rotations(rng: np.random.Generator, num: int) -> np.ndarray:
    """``num`` rotation matrices drawn uniformly (Haar measure) over all of SO(3), in float64.

    Normalised Gaussian quaternions are uniform on the 3-sphere, hence Haar on SO(3); float64
    keeps the matrices orthogonal to 1e-16, which rounding-level equivariance tests need.
    """
    q = rng.normal(size=(num, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


@functools.partial(jax.jit, static_argnums=0)  # one compile per degree: eagerly, e3nn's ~60 ops take seconds
def wigner_d(degree: int, rotation: jax.Array) -> jax.Array:
    """Real Wigner-D matrix of ``degree`` for ``rotation`` in e3nn's basis (what the
    harmonics and Clebsch–Gordan numbers use)."""
    # imported here: the benchmarks import this module, and e3nn-jax (scipy, sympy) holds
    # ~100 MB of a process's memory that never calls this
    import e3nn_jax as e3nn

    return e3nn.Irrep(degree, (-1) ** degree).D_from_matrix(rotation)


def rotate_features(features: dict, rotation: jax.Array) -> dict:
    """Apply ``rotation`` to per-degree features ``{d: [N, C, 2d+1]}``."""
    return {d: jnp.einsum("mk,nck->ncm", wigner_d(d, rotation).astype(x.dtype), x) for d, x in features.items()}


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (0 if both vanish)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    diff = np.max(np.abs(actual - expected))
    return float(diff / scale) if scale > 0 else float(diff)


def assert_equivariant(
    fn: Callable, positions: jax.Array, features: dict, rotations, rtol: float, translation: jax.Array | None = None
) -> None:
    """Assert ``fn(R x + t, D(R) f) == D(R) fn(x, f)`` for every rotation ``R``.

    ``fn(positions [N, 3], features {d: [N, C, 2d+1]}) -> {d: [..., C, 2d+1]}``: degree-0
    outputs must be invariant, degree-d outputs rotate with the Wigner-D matrix. With
    ``translation``, it is added to the rotated positions as well (SE(3), not only SO(3)).
    The largest relative error over all rotations and degrees must be at most ``rtol``;
    outputs must be finite and not all zero (a test that cannot fail proves nothing).
    """
    reference = fn(positions, features)
    norms = [float(jnp.max(jnp.abs(v))) for v in reference.values()]
    assert all(np.isfinite(norms)) and max(norms) > 0, f"degenerate outputs: {norms}"
    worst = 0.0
    for rotation in rotations:
        rotation = jnp.asarray(rotation, positions.dtype)
        moved = positions @ rotation.T
        if translation is not None:
            moved = moved + translation
        rotated = fn(moved, rotate_features(features, rotation))
        expected = rotate_features(reference, rotation)
        assert set(rotated) == set(expected)
        for d in expected:
            worst = max(worst, relative_error(rotated[d], expected[d]))
    assert worst <= rtol, f"equivariance error {worst:.3e} exceeds {rtol:.1e}"


def water():
    """``(atoms, positions)`` of water (O-H 0.9572 A, H-O-H 104.5 degrees)."""
    return ["O", "H", "H"], np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])


def methane():
    """Ideal methane (C-H 1.09 A, tetrahedral): four symmetry-equivalent hydrogens."""
    tetrahedron = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    return ["C", "H", "H", "H", "H"], np.concatenate([np.zeros((1, 3)), 1.09 * tetrahedron])


def benzene():
    """Planar benzene: C-C 1.39 A, C-H 1.09 A (atoms 0-5 carbons, 6-11 their hydrogens)."""
    angles = np.arange(6) * np.pi / 3
    ring = np.stack([np.cos(angles), np.sin(angles), np.zeros(6)], axis=1)
    return ["C"] * 6 + ["H"] * 6, np.concatenate([1.39 * ring, (1.39 + 1.09) * ring])


def synthetic_molecule(rng: np.random.Generator, num_atoms: int, num_rings: int = 1, target: float | None = None):
    """A QM9-like random molecule: a random tree of ~1.1–1.5 Å bonds plus ``num_rings`` ring
    closures (bonds in both directions, adjacent: paired edges; ~2.1 directed edges per
    atom), H/C/N/O/F atoms with the 6 node features of the QM9 pipeline, one-hot bond types."""
    pos = np.zeros((num_atoms, 3))
    bonds = []
    for i in range(1, num_atoms):
        j = int(rng.integers(0, i))
        direction = rng.normal(size=3)
        pos[i] = pos[j] + direction / np.linalg.norm(direction) * rng.uniform(1.1, 1.5)
        bonds.append((i, j))
    existing = set(bonds) | {(j, i) for i, j in bonds}
    for _ in range(num_rings if num_atoms > 3 else 0):
        i, j = (int(v) for v in rng.choice(num_atoms, 2, replace=False))
        if (i, j) not in existing:
            bonds.append((i, j))
            existing |= {(i, j), (j, i)}
    senders = [v for i, j in bonds for v in (i, j)]  # paired edges: i->j then j->i
    receivers = [v for i, j in bonds for v in (j, i)]
    bond_type = rng.integers(0, 4, len(bonds))
    edge_features = np.eye(4)[np.repeat(bond_type, 2)].reshape(-1, 4)
    element = rng.integers(0, 5, num_atoms)
    atomic_number = np.array([1, 6, 7, 8, 9])[element]
    node_features = np.concatenate([np.eye(5)[element], atomic_number[:, None]], axis=1)
    globals_ = None if target is None else {TARGET: np.float32(target)}
    return molecule_graph(pos, node_features, senders, receivers, edge_features, globals_)


def synthetic_batch(
    rng: np.random.Generator, num_molecules: int, budget: PaddingBudget | None = None, mean_atoms: int = 18
):
    """``num_molecules`` QM9-sized molecules (about 18 atoms, 38 directed bond edges each),
    padded to ``budget`` (default: the budget the QM9 loader would use for this batch size)."""
    mols = [
        synthetic_molecule(rng, int(np.clip(rng.normal(mean_atoms, 3), 3, 29)), num_rings=2, target=float(rng.normal()))
        for _ in range(num_molecules)
    ]
    if budget is None:
        # QM9's mean sizes; the largest synthetic molecule (29 atoms, a tree of 28 bonds plus 2
        # ring closures) has 60 directed edges, more than QM9's largest (56)
        budget = PaddingBudget.for_batch(num_molecules, **{**QM9_SIZES, "max_edges": 2 * (29 - 1 + 2)})
    return pad_to_budget(mols, budget)
