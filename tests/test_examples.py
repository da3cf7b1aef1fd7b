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
