"""Periodic systems end to end (float64): a trunk energy on radius graphs with image shifts is
invariant to the cell origin, to wrapping atoms into the cell and to rotating cell and
positions together; forces and stress are the derivatives (finite differences across the
periodic boundary and under strain); the ASE calculator serves them; the jit cell list gives
the same energy as the host graph."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms

from se3jax.ase_calculator import RadiusGraphCalculator, SE3Calculator
from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.initialisation import init_params
from se3jax.model import SE3Transformer
from se3jax.neighbours import cell_list_radius_graph
from se3jax.testing import random_rotations

# one xdist worker runs this module: its tests share module-level fixtures and caches
pytestmark = pytest.mark.xdist_group("test_periodic")

CUTOFF = 3.0
SPECIES = jnp.zeros(100, jnp.int32).at[1].set(0).at[8].set(1)  # H -> 0, O -> 1


def make_energy_fn():
    trunk = SE3Transformer(
        Fiber({0: 2}), Fiber.create(2, 4), Fiber({0: 1}), num_layers=1, num_heads=2,
        execution=Execution(precision="fp64"),
    )  # fmt: skip

    def energy_fn(params, numbers, positions, cell, graph):
        shifts = None if cell is None else graph.shifts
        edges = edge_inputs(positions, graph.senders, graph.receivers, 1, mask=graph.mask, shifts=shifts, cell=cell)
        features = {0: jax.nn.one_hot(SPECIES[numbers], 2, dtype=positions.dtype)[:, :, None]}
        return jnp.sum(trunk.apply(params, features, edges)[0])

    return trunk, energy_fn


@pytest.fixture
def system(x64):
    """8 atoms in a skewed cell narrower than twice the cutoff (several images per pair)."""
    rng = np.random.default_rng(0)
    cell = np.array([[4.2, 0.0, 0.0], [0.9, 4.0, 0.0], [-0.5, 0.7, 4.4]])
    while True:  # atoms no closer than 0.9 A through any image
        frac = rng.uniform(0, 1, size=(8, 3))
        d = frac[:, None] - frac[None]
        d -= np.round(d)
        dist = np.linalg.norm(d @ cell, axis=-1) + np.eye(8) * 9
        if dist.min() > 0.9:
            break
    atoms = Atoms(numbers=[8, 1, 1, 8, 1, 1, 8, 1], scaled_positions=frac, cell=cell, pbc=True)
    trunk, energy_fn = make_energy_fn()
    features = {0: jnp.ones((8, 2, 1), jnp.float64)}

    @jax.jit  # one compiled call: op by op, the cell list compiles every primitive on its own
    def edges_of(x):
        graph = cell_list_radius_graph(x, CUTOFF, 64, cell=cell, pbc=True)
        return edge_inputs(x, graph.senders, graph.receivers, 1, mask=graph.mask, shifts=graph.shifts, cell=cell)

    params = init_params(trunk, jax.random.PRNGKey(0), features, edges_of(jnp.asarray(atoms.positions)))
    bound = lambda numbers, positions, c, g: energy_fn(params, numbers, positions, c, g)
    atoms.calc = RadiusGraphCalculator(bound, CUTOFF, max_neighbours=64)
    return atoms, bound, params


def evaluate(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)


def test_energy_invariant_to_origin_wrapping_and_rotation(system):
    atoms, _, _ = system
    calc = atoms.calc
    energy, forces, stress = evaluate(atoms, calc)
    assert np.isfinite(energy) and np.abs(forces).max() > 1e-6
    moved = atoms.copy()
    moved.translate([1.7, -2.3, 0.4])  # another cell origin: atoms cross the faces
    e_moved, f_moved, _ = evaluate(moved, calc)
    unwrapped = atoms.copy()
    unwrapped.positions += np.array([1, -2, 1]) @ atoms.cell[:] * np.array([[1], [0], [1], [0], [0], [1], [0], [1]])
    e_unwrapped, f_unwrapped, _ = evaluate(unwrapped, calc)  # some atoms moved by lattice vectors
    moved.wrap()
    e_wrapped, _, _ = evaluate(moved, calc)
    for e in (e_moved, e_unwrapped, e_wrapped):
        assert abs(e - energy) < 1e-10 * abs(energy)
    np.testing.assert_allclose(f_moved, forces, atol=1e-10)
    np.testing.assert_allclose(f_unwrapped, forces, atol=1e-10)
    for rotation in random_rotations(np.random.default_rng(1), 2):
        turned = atoms.copy()
        turned.set_cell(atoms.cell[:] @ rotation.T, scale_atoms=False)
        turned.positions = atoms.positions @ rotation.T
        e_rot, f_rot, s_rot = evaluate(turned, calc)
        assert abs(e_rot - energy) < 1e-10 * abs(energy)
        np.testing.assert_allclose(f_rot, forces @ rotation.T, atol=1e-9)
        np.testing.assert_allclose(s_rot, rotation @ stress @ rotation.T, atol=1e-9)


def test_forces_and_stress_match_finite_differences_across_the_boundary(system):
    atoms, _, _ = system
    calc = atoms.calc
    atoms = atoms.copy()
    atoms.positions[0] = -0.3 * atoms.cell[0] / np.linalg.norm(atoms.cell[0])  # just outside the cell
    energy, forces, stress = evaluate(atoms, calc)
    h = 1e-5
    for atom, axis in [(0, 0), (0, 2), (3, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        numeric = -(evaluate(plus, calc)[0] - evaluate(minus, calc)[0]) / (2 * h)
        assert abs(numeric - forces[atom, axis]) < 1e-6 * max(1.0, abs(forces[atom, axis])), (
            numeric,
            forces[atom, axis],
        )
    volume = atoms.get_volume()
    for a, b in [(0, 0), (1, 2), (2, 1)]:
        strained = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * h
            s = atoms.copy()
            s.set_cell(atoms.cell[:] @ strain, scale_atoms=False)
            s.positions = atoms.positions @ strain
            strained.append(evaluate(s, calc)[0])
        numeric = (strained[0] - strained[1]) / (2 * h) / volume
        assert abs(numeric - stress[a, b]) < 1e-6 * max(1.0, abs(stress[a, b])), (numeric, stress[a, b])


def test_cell_list_under_jit_gives_the_host_graph_energy(system):
    atoms, energy_fn, _ = system
    cell = atoms.cell[:]

    @jax.jit
    def energy(positions):
        graph = cell_list_radius_graph(positions, CUTOFF, 64, cell=cell, pbc=True)
        return energy_fn(jnp.asarray(atoms.numbers), positions, jnp.asarray(cell), graph), graph.overflow

    e, overflow = energy(jnp.asarray(atoms.positions))
    assert int(overflow) == 0
    assert abs(float(e) - atoms.get_potential_energy()) < 1e-10 * abs(float(e))


def test_calculator_errors_are_clear(system):
    atoms, energy_fn, _ = system
    molecule = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    molecule.calc = RadiusGraphCalculator(energy_fn, CUTOFF)
    assert np.isfinite(molecule.get_potential_energy()) and molecule.get_forces().shape == (3, 3)
    with pytest.raises(ValueError, match="stress needs a periodic cell"):
        molecule.get_stress()


def test_bond_graph_calculator_refuses_periodic_atoms(trained_energy_workdir):
    atoms = Atoms("CH4", positions=np.random.default_rng(0).normal(size=(5, 3)), cell=np.eye(3) * 6, pbc=True)
    atoms.calc = SE3Calculator(trained_energy_workdir)
    with pytest.raises(ValueError, match="no periodic images"):
        atoms.get_potential_energy()
