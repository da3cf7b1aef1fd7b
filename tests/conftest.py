"""Shared fixtures: float64 mode, NaN debugging, small padded molecule batches, a QM9 subset.

Two simulated CPU devices (set before JAX starts) let the data-parallel tests run anywhere.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402
import numpy as np
import pytest

from se3jax.graphs import PaddingBudget
from se3jax.testing import synthetic_batch


@pytest.fixture
def x64():
    """Run a test in float64 (equivariance to rounding level), then restore float32."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.fixture
def debug_nans():
    """Any NaN produced inside a jitted/evaluated computation raises immediately."""
    jax.config.update("jax_debug_nans", True)
    try:
        yield
    finally:
        jax.config.update("jax_debug_nans", False)


@pytest.fixture
def small_batch():
    """Three small molecules padded with room to spare (padding nodes, edges and graphs)."""
    rng = np.random.default_rng(0)
    return synthetic_batch(rng, 3, PaddingBudget(n_node=48, n_edge=96, n_graph=5), mean_atoms=8)


@pytest.fixture(scope="session")
def rotations():
    """Five seeded rotations drawn uniformly over all of SO(3)."""
    from se3jax.testing import random_rotations
    return random_rotations(np.random.default_rng(42), 5)


@pytest.fixture(scope="session")
def qm9_subset_cache(tmp_path_factory):
    """A cache folder holding the first 400 QM9 molecules, processed once per session (the
    tiny training config reads exactly this subset)."""
    from se3jax.data.qm9 import load_qm9
    cache = tmp_path_factory.mktemp("qm9_subset")
    load_qm9(cache, max_molecules=400, num_workers=1)
    return cache


@pytest.fixture(scope="session")
def qm9_subset(qm9_subset_cache):
    from se3jax.data.qm9 import load_qm9
    return load_qm9(qm9_subset_cache, max_molecules=400, num_workers=1)
