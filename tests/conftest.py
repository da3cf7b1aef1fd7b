"""Shared fixtures: float64 mode, NaN debugging, small padded molecule batches, a QM9 subset.

Two simulated CPU devices (set before JAX starts) let the data-parallel tests run anywhere.

Speed (the suite runs on 2 cores): the expensive session fixtures (QM9 subsets, trained
workdirs) are built once per run and shared by the xdist workers (:func:`built_once`, a file
lock), and one persistent JAX compilation cache serves the whole run -- the workers, and the
training and multi-host subprocesses the tests start (they inherit its environment variable):
a program compiled once (the same model in several tests or processes) is loaded, not compiled
again. The cache folder is new for every run and removed at its end.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# How the suite's XLA compiles: compiling dominates it (tiny models, a few steps each).
# - LLVM at -O0 cuts a model's compile time by about a third. Its code runs several times
#   slower (the denoising example's step 0.11 s against 0.02 s at -O1), but compiling dominates:
#   at -O1 the whole suite took 11 min 12 s against 7 min 46 s (2026-11-30).
# - XLA's classic CPU fusion emitters compile these models' ~800 small fusions about 40% faster
#   than the newer ones (tests/test_trunk.py + test_layers.py: 276 s -> 213 s).
# - LLVM code generated as one module, not split for parallel compilation: the 2 workers already
#   use both cores (a 2-layer model's training step: 7.0 -> 6.3 s, median of 9; test_layers.py +
#   test_trunk.py alternated: 151, 136 s split, 126, 126 s unsplit; 2026-12-01).
# Flags are probed first: XLA aborts on a flag it does not know, and a later XLA may drop one
# (JAX 0.12 has no fusion-emitter flag).
# The numbers are the same up to float rounding, which every tolerance allows. Benchmarks and
# users keep XLA's defaults. The run's first process decides; its workers and subprocesses
# inherit the environment.
OPTIONAL_XLA_FLAGS = ["--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"]


def _xla_accepts(flags: list[str]) -> bool:
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


if "SE3JAX_TESTS_XLA_FLAGS" not in os.environ:
    flags = ["--xla_force_host_platform_device_count=2", "--xla_backend_optimization_level=0"]
    # one probe when XLA knows them all
    flags += (
        OPTIONAL_XLA_FLAGS if _xla_accepts(OPTIONAL_XLA_FLAGS) else [f for f in OPTIONAL_XLA_FLAGS if _xla_accepts([f])]
    )
    os.environ["SE3JAX_TESTS_XLA_FLAGS"] = " ".join(flags)
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run makes it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="se3jax-tests-jax-cache-")
    os.environ["SE3JAX_TESTS_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

from se3jax.graphs import PaddingBudget  # noqa: E402
from se3jax.testing import synthetic_batch  # noqa: E402


def pytest_collection_finish(session):
    """Say so when ``--dist loadgroup`` does not group: each worker then builds the marked
    modules' fixtures itself (the multi-host runs twice: +85 s). pytest 9.2 with xdist 3.8
    drops the group suffix silently (pytest-dev/pytest-xdist#1386), hence ``pytest<9.2``."""
    if not session.config.getoption("loadgroup", default=False):
        return  # not an xdist worker under loadgroup
    lost = [item for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        session.config.issue_config_time_warning(
            pytest.PytestWarning(
                f"--dist loadgroup is not grouping ({len(lost)} marked tests without a group, e.g. "
                f"{lost[0].nodeid}): module fixtures are built once per worker"
            ),
            stacklevel=2,
        )


def pytest_unconfigure(config):
    if os.environ.get("SE3JAX_TESTS_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that ``build(folder)`` fills once per test run. Under xdist the workers share
    it: the first one builds it while holding a file lock, the others wait, then reuse it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above each worker's
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


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


# Relative tolerance of float32 results under a precision policy, per backend. fp32 (every
# contraction at Precision.HIGHEST): float32 rounding. tf32: the same on a CPU (no TensorFloat-32
# there); on a GPU 10-bit mantissa operands, README "Precision policies": invariance errors
# 4.5e-3 (H200) / 5.6e-3 (H100). bf16 / fp16 (8 / 11 mantissa bits): 2.6e-2 / 3.7e-3 on a CPU.
_RTOL = {"cpu": {"fp32": 1e-5, "tf32": 1e-5, "bf16": 5e-2, "fp16": 1e-2}}
_RTOL["gpu"] = {**_RTOL["cpu"], "tf32": 2e-2}


@pytest.fixture(scope="session")
def precision_rtol():
    """``precision_rtol(policy)``: the relative tolerance of that policy's results on this
    backend (values; gradients get 10x)."""
    return _RTOL["cpu" if jax.default_backend() == "cpu" else "gpu"].__getitem__


@pytest.fixture(scope="session")
def small_batch():
    """Three small molecules padded with room to spare (padding nodes, edges and graphs).
    Shared by every test (read only: its arrays refuse writes)."""
    rng = np.random.default_rng(0)
    batch = synthetic_batch(rng, 3, PaddingBudget(n_node=48, n_edge=96, n_graph=5), mean_atoms=8)
    for leaf in jax.tree.leaves(batch):
        leaf.setflags(write=False)
    return batch


@pytest.fixture(scope="session")
def rotations():
    """Five seeded rotations drawn uniformly over all of SO(3)."""
    from se3jax.testing import random_rotations

    return random_rotations(np.random.default_rng(42), 5)


@pytest.fixture(scope="session")
def qm9_subset_cache(tmp_path_factory):
    """A cache folder holding the first 400 QM9 molecules, processed once per run (the tiny
    training config reads exactly this subset)."""
    from se3jax.data.qm9 import load_qm9

    return built_once(tmp_path_factory, "qm9_subset", lambda cache: load_qm9(cache, max_molecules=400, num_workers=1))


@pytest.fixture(scope="session")
def qm9_1000_cache(tmp_path_factory):
    """A cache folder holding the first 1,000 QM9 molecules, processed once per run in worker
    processes (the data and loader tests' subset)."""
    from se3jax.data.qm9 import load_qm9

    return built_once(tmp_path_factory, "qm9_1000", lambda cache: load_qm9(cache, max_molecules=1000))


@pytest.fixture(scope="session")
def qm9_subset(qm9_subset_cache):
    from se3jax.data.qm9 import load_qm9

    return load_qm9(qm9_subset_cache, max_molecules=400, num_workers=1)


def tiny_config(cache_dir, **overrides):
    """configs/test.py reading the QM9 subset at ``cache_dir``, with ``overrides``."""
    from se3jax.training.config import load_config_file

    config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "test.py")
    config.cache_dir = str(cache_dir)
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, qm9_subset_cache):
    """A training workdir of the tiny config, trained for 3 steps on the QM9 subset (read only:
    the xdist workers share it)."""
    from se3jax.training.train import train_and_evaluate

    config = tiny_config(qm9_subset_cache, max_train_molecules=32, max_steps=3)
    return built_once(tmp_path_factory, "trained", lambda workdir: train_and_evaluate(config, workdir))


@pytest.fixture(scope="session")
def trained_energy_workdir(tmp_path_factory, qm9_subset_cache):
    """A workdir of the tiny config trained on U0 with sum pooling (an energy model), 3 steps
    (read only: shared by the xdist workers)."""
    from se3jax.training.train import train_and_evaluate

    config = tiny_config(
        qm9_subset_cache, task="U0", pooling="sum", max_train_molecules=32, max_eval_molecules=16, max_steps=3
    )
    return built_once(tmp_path_factory, "trained_energy", lambda workdir: train_and_evaluate(config, workdir))
