"""Energies and forces: sum pooling with per-atom references gives smooth, equivariant forces
(also through ASE); max pooling is refused for forces; degenerate geometry is an error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax import inference
from se3jax.data.molecules import molecule_to_graph
from se3jax.testing import methane, random_rotations, relative_error

# one xdist worker runs this module: its tests share module-level fixtures and caches
pytestmark = pytest.mark.xdist_group("test_energy_and_forces")

METHANE = methane()


@pytest.fixture(scope="module")
def energy_predictor(trained_energy_workdir):
    return inference.load_predictor(trained_energy_workdir, batch_size=4)


def test_energy_predictor_adds_the_atoms_reference_energies(energy_predictor):
    assert energy_predictor.task == "U0" and energy_predictor.unit == "eV"
    assert energy_predictor.smooth_gradients and energy_predictor.normalisation.atom_reference
    energy = energy_predictor.predict_molecules([METHANE])[0]
    refs = energy_predictor.normalisation.atom_reference
    # U0 of methane is about -1100 eV: dominated by the references, not the tiny model
    assert abs(energy - (refs[6] + 4 * refs[1])) < 50 and energy < -500


def as_float64(graphs):
    return jax.tree.map(lambda x: x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x, graphs)


def test_forces_rotate_with_a_symmetric_molecule_and_match_finite_differences(trained_energy_workdir, x64):
    """Methane's four H are symmetry-equivalent: with max pooling their ties would make the
    gradient jump; with sum pooling it is smooth: F(R x) = R F(x) to rounding level in
    float64, the forces sum to zero (translation invariance) and equal central differences."""
    predictor = inference.load_predictor(trained_energy_workdir, precision="fp64", batch_size=4)
    graphs = as_float64(inference.molecules_to_graphs([METHANE], predictor.budget))
    forces = jax.jit(predictor.forces)
    reference = np.asarray(forces(predictor.params, graphs))[:5]
    assert np.abs(reference).max() > 1e-4 and np.abs(reference.sum(0)).max() < 1e-9 * np.abs(reference).max()
    positions = np.asarray(graphs.nodes["positions"])
    for rotation in random_rotations(np.random.default_rng(0), 3):
        rotated = graphs._replace(nodes={**graphs.nodes, "positions": positions @ rotation.T})
        got = np.asarray(forces(predictor.params, rotated))[:5]
        assert relative_error(got, reference @ rotation.T) < 1e-9

    energy = jax.jit(
        lambda p: predictor.predict(predictor.params, graphs._replace(nodes={**graphs.nodes, "positions": p}))[0]
    )
    h = 1e-4
    for atom, axis in ((1, 0), (2, 2), (0, 1)):
        step = np.zeros_like(positions)
        step[atom, axis] = h
        numeric = -(float(energy(positions + step)) - float(energy(positions - step))) / (2 * h)
        assert numeric == pytest.approx(reference[atom, axis], rel=1e-5, abs=1e-8)


def test_max_pooled_model_refuses_forces(trained_workdir):
    predictor = inference.load_predictor(trained_workdir, batch_size=4)
    assert not predictor.smooth_gradients
    graphs = inference.molecules_to_graphs([METHANE], predictor.budget)
    with pytest.raises(ValueError, match="gradients jump between symmetry-equivalent atoms"):
        predictor.forces(predictor.params, graphs)


def test_ase_calculator_gives_energy_and_forces(trained_energy_workdir, energy_predictor):
    from ase import Atoms

    from se3jax.ase_calculator import SE3Calculator

    atoms = Atoms(symbols="CH4", positions=METHANE[1])
    atoms.calc = SE3Calculator(trained_energy_workdir)
    energy = atoms.get_potential_energy()
    assert energy == pytest.approx(energy_predictor.predict_molecules([METHANE])[0], rel=1e-5)
    forces = atoms.get_forces()
    graphs = inference.molecules_to_graphs([METHANE], energy_predictor.budget)
    expected = np.asarray(jax.jit(energy_predictor.forces)(energy_predictor.params, graphs))[:5]
    assert forces.shape == (5, 3) and np.abs(forces).max() > 0
    np.testing.assert_allclose(forces, expected, rtol=1e-5, atol=1e-7)


def test_ase_calculator_refuses_a_max_pooled_homo_model(trained_workdir):
    from se3jax.ase_calculator import SE3Calculator

    with pytest.raises(ValueError, match="an ASE calculator needs an energy model"):
        SE3Calculator(trained_workdir)


@pytest.mark.parametrize("build", ["molecule", "predictor"])
def test_coincident_atoms_are_an_error_naming_them(build, energy_predictor):
    atoms, positions = METHANE
    bad = positions.copy()
    bad[3] = bad[1] + 0.01
    with pytest.raises(ValueError, match="atoms 1 and 3 are 0.0173 A apart"):
        if build == "molecule":
            molecule_to_graph(atoms, bad)
        else:
            energy_predictor.predict_molecules([(atoms, bad)])


def test_batches_with_a_zero_length_bond_are_refused_on_the_host(energy_predictor):
    graph = molecule_to_graph(*METHANE)
    positions = graph.nodes["positions"].copy()
    positions[2] = positions[0]  # atom 2 onto the carbon it is bonded to
    broken = graph._replace(nodes={**graph.nodes, "positions": positions})
    with pytest.raises(ValueError, match="joins nodes 0 and 2, which are 0.00e\\+00 apart"):
        energy_predictor.predict_molecules([broken])
    assert bool(jnp.isfinite(energy_predictor.predict_molecules([graph])[0]))
