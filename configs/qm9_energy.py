"""The energy-and-forces recipe: the reference model and optimiser on QM9's U0 (internal energy
at 0 K, eV) with sum pooling over atoms and per-element reference energies fitted on the
training split (se3jax.data.qm9.Normalisation), so the prediction is a smooth sum of atomic
contributions and its negative gradient with respect to positions is a force field:
``Predictor.forces`` and the ASE calculator (se3jax.ase_calculator).

    python train/main.py --config configs/qm9_energy.py --workdir runs/u0
"""

from se3jax.training.config import default_config


def get_config():
    config = default_config()
    config.task = "U0"
    config.pooling = "sum"  # what "auto" picks for U0 too; explicit, forces depend on it
    config.precision = "tf32"
    return config
