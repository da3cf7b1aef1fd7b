"""The kernel bases are equivariant: K(R r) = D_in(R) K(r) D_out(R)^T, for every path."""

import subprocess
import sys

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.basis import (
    CLEBSCH_GORDAN_TABLE,
    clebsch_gordan,
    clebsch_gordan_table_triples,
    edge_geometry,
    safe_directions,
    stacked_harmonics,
)
from se3jax.layers.convolution import all_paths, path_bases, path_bases_matrix
from se3jax.testing import wigner_d

MAX_DEGREE = 3


def _path_blocks(bases, max_degree):
    _, offsets = path_bases_matrix(max_degree)
    for a, b in all_paths(max_degree):
        f = 2 * min(a, b) + 1
        size = (2 * a + 1) * f * (2 * b + 1)
        yield a, b, bases[:, offsets[(a, b)] : offsets[(a, b)] + size].reshape(-1, 2 * a + 1, f, 2 * b + 1)


def test_harmonics_are_e3nns_with_integral_normalisation(x64):
    """Our recursion gives e3nn-jax's real spherical harmonics (its basis, signs and 'integral'
    normalisation), values and gradients, to float64 rounding up to order 6 (the highest the
    models use: twice their highest degree, 3)."""
    order = 6
    vectors = jnp.asarray(np.random.default_rng(3).normal(size=(20, 3)))
    irreps = e3nn.Irreps([(1, (j, (-1) ** j)) for j in range(order + 1)])

    def ours(v):
        return stacked_harmonics(safe_directions(v)[0], order)

    def theirs(v):
        # e3nn's dense recursion differentiated by plain autodiff: its default custom-JVP form
        # takes many times longer to trace, for the same numbers
        return e3nn.spherical_harmonics(
            irreps, v, normalize=True, normalization="integral", algorithm=("recursive", "dense")
        ).array

    np.testing.assert_allclose(jax.jit(ours)(vectors), jax.jit(theirs)(vectors), rtol=0, atol=1e-13)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(order + 1) ** 2))
    grads = [jax.jit(jax.grad(lambda v, f=f: jnp.sum(jnp.sin(f(v) @ weights))))(vectors) for f in (ours, theirs)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=1e-12)


def test_path_bases_rotate_with_wigner_d(x64, rotations):
    rng = np.random.default_rng(1)
    vectors = jnp.asarray(rng.normal(size=(7, 3)))
    unit, _, _ = safe_directions(vectors)
    bases_of = jax.jit(lambda u: path_bases(stacked_harmonics(u, 2 * MAX_DEGREE), MAX_DEGREE))
    bases = bases_of(unit)
    assert bases.dtype == jnp.float64 and bases.shape == (7, 1092)
    for rot in rotations:
        rot = jnp.asarray(rot)
        rotated = bases_of(unit @ rot.T)
        for (a, b, k), (_, _, k_rot) in zip(_path_blocks(bases, MAX_DEGREE), _path_blocks(rotated, MAX_DEGREE)):
            expected = jnp.einsum("lm,emfn,kn->elfk", wigner_d(a, rot), k, wigner_d(b, rot))
            np.testing.assert_allclose(k_rot, expected, rtol=0, atol=1e-12 * float(jnp.abs(k).max()))


def test_basis_blocks_are_nonzero_and_independent():
    """Every frequency of every path is a distinct, non-zero function of the direction."""
    unit, _, _ = safe_directions(jnp.asarray(np.random.default_rng(2).normal(size=(64, 3))))
    bases = path_bases(stacked_harmonics(unit, 2 * MAX_DEGREE), MAX_DEGREE)
    for a, b, k in _path_blocks(bases, MAX_DEGREE):
        flat = np.asarray(k).transpose(2, 0, 1, 3).reshape(k.shape[2], -1)
        assert np.linalg.matrix_rank(flat, tol=1e-4) == k.shape[2], (a, b)


def test_zero_length_edges_give_finite_values_and_gradients(debug_nans):
    positions = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    senders, receivers = jnp.array([0, 2, 1]), jnp.array([1, 0, 0])  # edge 1 has length 0

    def total(pos):
        harmonics, lengths = edge_geometry(pos, senders, receivers, 2 * MAX_DEGREE)
        return jnp.sum(path_bases(harmonics, MAX_DEGREE)) + jnp.sum(lengths)

    value, grad = jax.value_and_grad(total)(positions)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    _, lengths = edge_geometry(positions, senders, receivers, 2 * MAX_DEGREE)
    assert float(lengths[1]) == 0.0 and float(lengths[0]) == pytest.approx(np.sqrt(1.25))


def test_clebsch_gordan_table_is_e3nns_and_spares_its_import():
    """The shipped table (scripts/clebsch_gordan_table.py) holds e3nn-jax's coefficients,
    exactly, for every triple it lists; a triple beyond it comes from e3nn-jax itself. Building
    a model, training, inference and the benchmarks import no e3nn-jax (2.4 s of every run's
    start, and ~100 MB of the peak RSS the benchmarks report)."""
    with np.load(CLEBSCH_GORDAN_TABLE) as table:
        assert sorted(table.files) == sorted(f"{a}_{b}_{j}" for a, b, j in clebsch_gordan_table_triples())
    for a, b, j in clebsch_gordan_table_triples() + [(4, 4, 2)]:
        np.testing.assert_array_equal(clebsch_gordan(a, b, j), np.asarray(e3nn.clebsch_gordan(a, b, j), np.float64))
    probe = (
        "import sys, jax, numpy as np; from se3jax.layers.convolution import conv_plan; "
        "from se3jax.fiber import Fiber; import se3jax.training.train, se3jax.inference, se3jax.benchmarking; "
        "from se3jax.basis import stacked_harmonics; "
        "conv_plan(Fiber.create(4, 2), Fiber.create(4, 2), 'none', 3); stacked_harmonics(np.ones((2, 3)) / 3**0.5, 6); "
        "print(sorted(m for m in sys.modules if m.startswith(('e3nn', 'sympy'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split("\n")[-2] == "[]", (done.stdout, done.stderr[-2000:])
