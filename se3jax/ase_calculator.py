"""An ASE calculator for an energy model trained by se3jax (e.g. configs/qm9_energy.py):
energy in eV, forces in eV/A as the negative gradient of the energy.

    from ase.build import molecule
    from se3jax.ase_calculator import SE3Calculator

    atoms = molecule("CH4")
    atoms.calc = SE3Calculator("runs/u0")
    atoms.get_potential_energy(), atoms.get_forces()

Bonds are inferred from each geometry as for the training data (RDKit); the model is compiled
once per padding budget. Bond graphs have no periodic images, so :class:`SE3Calculator` refuses
periodic ``Atoms``; :class:`RadiusGraphCalculator` serves any energy function on radius graphs
(open or periodic, with stress). Needs ``pip install ase`` (the ``ase`` extra).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from se3jax.inference import load_predictor, molecules_to_graphs
from se3jax.neighbours import host_radius_graph
from se3jax.point_clouds import PointCloudGraph, check_graph

ENERGY_TASKS = ("U0", "U", "H", "G")


class SE3Calculator(Calculator):
    """Energy and forces of a trained se3jax energy model (a training workdir)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, workdir, precision: str | None = None, batch_size: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.predictor = load_predictor(workdir, precision=precision, batch_size=batch_size)
        if self.predictor.task not in ENERGY_TASKS or self.predictor.unit != "eV":
            raise ValueError(
                f"{workdir} predicts {self.predictor.task} ({self.predictor.unit}); an ASE calculator "
                f"needs an energy model ({', '.join(ENERGY_TASKS)} in eV, e.g. configs/qm9_energy.py)"
            )
        if not self.predictor.smooth_gradients:
            raise ValueError(
                f"{workdir} pools with {self.predictor.model.pooling!r}: its forces are ill-defined; "
                f"train with pooling='sum'"
            )
        predictor = self.predictor
        self._energy_and_forces = jax.jit(
            lambda params, graphs: (predictor.predict(params, graphs)[0], predictor.forces(params, graphs))
        )

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.atoms.pbc.any():
            raise ValueError(
                "SE3Calculator serves bond-graph (QM9) models, whose bonds have no periodic images: "
                "it cannot evaluate periodic Atoms (pbc=True); use RadiusGraphCalculator with a "
                "radius-graph energy model"
            )
        numbers, positions = self.atoms.get_atomic_numbers(), self.atoms.get_positions()
        graphs = molecules_to_graphs([(numbers, positions)], self.predictor.budget)
        energy, forces = self._energy_and_forces(self.predictor.params, graphs)
        self.results["energy"] = float(energy)
        self.results["forces"] = np.asarray(forces, np.float64)[: len(numbers)]


def energy_forces_stress(energy_fn: Callable, numbers, positions, cell, graph: PointCloudGraph):
    """Energy, forces ``-dE/dx`` and the stress ``(1/V) dE/d(strain)`` ``[3, 3]`` of
    ``energy_fn(numbers, positions, cell, graph) -> []`` (pure JAX; ``cell`` ``[3, 3]`` or
    None for an open system, when the stress is None). The strain deforms positions and cell
    together: ``x -> x (1 + e)``, ``cell -> cell (1 + e)``, the graph's integer shifts fixed."""
    if cell is None:
        energy, gradient = jax.value_and_grad(lambda x: energy_fn(numbers, x, None, graph))(positions)
        return energy, -gradient, None

    def strained(x, strain):
        deformation = jnp.eye(3, dtype=x.dtype) + strain
        deform = lambda v: jnp.matmul(v, deformation, precision=jax.lax.Precision.HIGHEST)
        return energy_fn(numbers, deform(x), deform(cell), graph)

    zero = jnp.zeros((3, 3), positions.dtype)
    energy, (gradient, virial) = jax.value_and_grad(strained, argnums=(0, 1))(positions, zero)
    return energy, -gradient, virial / jnp.abs(jnp.linalg.det(cell))


class RadiusGraphCalculator(Calculator):
    """Energy, forces and (for periodic cells) stress of any se3jax energy function on
    radius graphs: ``energy_fn(numbers [N], positions [N, 3], cell [3, 3] | None, graph) ->
    energy`` (a pure JAX function, parameters closed over, e.g. a trunk with a sum over
    atoms: see examples/periodic_force_field.py). The graph (edges within ``cutoff``, periodic
    images through the ``Atoms``' cell and pbc) is built on the host with
    :func:`se3jax.neighbours.host_radius_graph` and checked (budget, coincident atoms); the
    energy, forces and stress are one compiled call per system size. The stress is the
    derivative with respect to a strain, in ASE's Voigt order and sign (it exists whenever the
    energy is a smooth sum over the graph; a partly periodic cell is strained on every axis)."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, energy_fn: Callable, cutoff: float, max_neighbours: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.cutoff, self.max_neighbours = float(cutoff), int(max_neighbours)
        self._compute = jax.jit(lambda n, x, c, g: energy_forces_stress(energy_fn, n, x, c, g))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.any())
        if "stress" in properties and not periodic:
            raise ValueError("stress needs a periodic cell (Atoms with pbc=True and a cell)")
        positions = self.atoms.get_positions()
        cell = np.asarray(self.atoms.get_cell()[:], np.float64) if periodic else None
        graph = host_radius_graph(positions, self.cutoff, self.max_neighbours, cell=cell, pbc=self.atoms.pbc)
        check_graph(graph)
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        energy, forces, stress = self._compute(
            jnp.asarray(self.atoms.get_atomic_numbers()),
            jnp.asarray(positions, dtype),
            None if cell is None else jnp.asarray(cell, dtype),
            jax.tree.map(jnp.asarray, graph),
        )
        self.results["energy"] = float(energy)
        self.results["forces"] = np.asarray(forces, np.float64)
        if stress is not None:
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(stress, np.float64))
