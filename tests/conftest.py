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


def _jax_flag_on(name):
    jax.config.update(name, True)
    try:
        yield
    finally:
        jax.config.update(name, False)


@pytest.fixture
def x64():
    """Run a test in float64 (equivariance to rounding level), then restore float32."""
    yield from _jax_flag_on("jax_enable_x64")


@pytest.fixture
def debug_nans():
    """Any NaN produced inside a jitted/evaluated computation raises immediately."""
    yield from _jax_flag_on("jax_debug_nans")


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
def qm9_1000_cache(tmp_path_factory):
    """A cache folder holding the first 1,000 QM9 molecules, processed once per session in
    worker processes (the data and loader tests' subset)."""
    from se3jax.data.qm9 import load_qm9

    cache = tmp_path_factory.mktemp("qm9_1000")
    load_qm9(cache, max_molecules=1000)
    return cache


@pytest.fixture(scope="session")
def qm9_subset(qm9_subset_cache):
    from se3jax.data.qm9 import load_qm9

    return load_qm9(qm9_subset_cache, max_molecules=400, num_workers=1)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, qm9_subset_cache):
    """A training workdir of the tiny config, trained for 3 steps on the QM9 subset."""
    from pathlib import Path

    from se3jax.training.config import load_config_file
    from se3jax.training.train import train_and_evaluate

    config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "test.py")
    config.cache_dir = str(qm9_subset_cache)
    config.max_train_molecules = 32
    config.max_steps = 3
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def trained_energy_workdir(tmp_path_factory, qm9_subset_cache):
    """A workdir of the tiny config trained on U0 with sum pooling (an energy model), 3 steps."""
    from pathlib import Path

    from se3jax.training.config import load_config_file
    from se3jax.training.train import train_and_evaluate

    config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "test.py")
    config.cache_dir = str(qm9_subset_cache)
    config.task, config.pooling = "U0", "sum"
    config.max_train_molecules, config.max_eval_molecules, config.max_steps = 32, 16, 3
    workdir = tmp_path_factory.mktemp("trained_energy")
    train_and_evaluate(config, workdir)
    return workdir
