"""Shared fixtures: float64 mode, NaN debugging, small padded molecule batches."""

import jax
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
