"""The examples run on real data and do what they say (examples/)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_denoising_example_learns_equivariant_displacements(qm9_subset_cache):
    import denoise_qm9

    result = denoise_qm9.train(steps=400, molecules=400, cache_dir=qm9_subset_cache, log_every=0)
    losses = np.asarray(result["losses"])
    assert np.all(np.isfinite(losses))
    # it learns: below the do-nothing baseline (the noise variance), and falling
    assert losses[-50:].mean() < 0.85 * result["baseline"], losses[-50:].mean()
    assert losses[-50:].mean() < losses[50:100].mean()
    # the predicted vectors rotate with the molecules (float32 rounding level)
    assert result["equivariance_error"] < 1e-5


def test_periodic_force_field_learns_lennard_jones_forces_equivariantly():
    import periodic_force_field

    result = periodic_force_field.train(repeat=3, steps=50, configurations=4, log_every=0)
    losses = np.asarray(result["losses"])
    assert result["atoms"] == 108 and 1700 < result["edges"] < 2100  # ~18 neighbours, through the boundary
    assert np.all(np.isfinite(losses))
    # it learns the forces: well below the do-nothing baseline (the mean squared force), falling
    assert losses[-10:].mean() < 0.6 * result["baseline"], (losses[-10:].mean(), result["baseline"])
    assert losses[-10:].mean() < losses[:10].mean()
    # predicted forces rotate with the box (positions and cell together; float32 rounding level)
    assert result["equivariance_error"] < 2e-5
