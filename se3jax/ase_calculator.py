"""An ASE calculator for an energy model trained by se3jax (e.g. configs/qm9_energy.py):
energy in eV, forces in eV/A as the negative gradient of the energy.

    from ase.build import molecule
    from se3jax.ase_calculator import SE3Calculator

    atoms = molecule("CH4")
    atoms.calc = SE3Calculator("runs/u0")
    atoms.get_potential_energy(), atoms.get_forces()

Bonds are inferred from each geometry as for the training data (RDKit); the model is compiled
once per padding budget. Needs ``pip install ase`` (the ``ase`` extra).
"""

from __future__ import annotations

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from se3jax.inference import load_predictor, molecules_to_graphs

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
        numbers, positions = self.atoms.get_atomic_numbers(), self.atoms.get_positions()
        graphs = molecules_to_graphs([(numbers, positions)], self.predictor.budget)
        energy, forces = self._energy_and_forces(self.predictor.params, graphs)
        self.results["energy"] = float(energy)
        self.results["forces"] = np.asarray(forces, np.float64)[: len(numbers)]
