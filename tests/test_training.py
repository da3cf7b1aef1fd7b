"""Training end to end on a small QM9 subset: learning, exact resume, data parallelism,
loss scaling, and clear errors for bad configs and corrupt checkpoints."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from se3jax import host_memory
from se3jax.compilation_cache import use_compilation_cache
from se3jax.data.loader import BatchLoader, budget_for
from se3jax.graphs import HARMONICS, pad_to_budget
from se3jax.training.checkpoints import Checkpointer, CheckpointError
from se3jax.training.config import load_config_file, validate_config
from se3jax.training.parallel import DataParallel
from se3jax.training.steps import create_train_state, make_train_step
from se3jax.training.train import build_model, train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(qm9_subset_cache):
    c = load_config_file(REPO / "configs" / "test.py")
    c.cache_dir = str(qm9_subset_cache)
    return c


def final_params(workdir: Path):
    """Parameters of the newest checkpoint, as numpy arrays."""
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored.state["params"]


def read_metrics(workdir: Path, key: str) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l)[key] for l in lines if key in json.loads(l)]


def test_tiny_training_learns_and_writes_its_workdir(config, tmp_path, monkeypatch):
    """The tiny config learns: on 32 molecules at learning rate 0.01 the normalised L1 loss
    falls below 0.7 within 40 steps. (Predicting the training mean scores about 0.8, E|z| for
    Gaussian targets; the model starts near 1.0-1.2 and measured 0.54 after 40 steps.)"""
    releases = []  # the step compiles once, ahead of its first call, then frees the compiler's memory
    monkeypatch.setattr(host_memory, "release_freed_host_memory", lambda: releases.append(1))
    config.max_train_molecules = 32
    config.num_epochs = 20  # 2 steps per epoch: 40 steps
    config.learning_rate = 1e-2
    config.log_every_steps = 2
    config.eval_every_epochs = 20
    result = train_and_evaluate(config, tmp_path)
    losses = read_metrics(tmp_path, "train_loss")
    assert len(losses) == 20 and losses[0] > 0.9
    assert np.mean(losses[-3:]) < 0.7, losses
    assert result["step"] == 40 and np.isfinite(result["val_mae"]) and np.isfinite(result["test_mae"])
    assert len(releases) == 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_epochs"] == 20 and saved["task"] == "homo"
    norm = json.loads((tmp_path / "normalisation.json").read_text())
    assert norm["unit"] == "eV" and norm["std"] > 0
    assert any((tmp_path / "tensorboard").iterdir())
    # a rerun of the finished run reports its results: no training, no second test evaluation
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert train_and_evaluate(config, tmp_path) == result
    assert (tmp_path / "metrics.jsonl").read_text() == metrics and len(read_metrics(tmp_path, "test_mae")) == 1


COMPILE_AFTER_START_RUN = """
import sys, jax, jax.numpy as jnp
from se3jax.training.config import load_config_file
from se3jax.training.train import start_run
config = load_config_file("configs/test.py")
config.cache_dir, config.compilation_cache = sys.argv[1], sys.argv[2] == "on"
start_run(config, sys.argv[1] + "/workdir")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # keep even this small program
jax.jit(lambda x: jnp.sin(x) * 2)(1.0)
print(jax.config.jax_compilation_cache_dir)
"""


def test_compiled_programs_are_kept_under_the_cache_dir(tmp_path):
    """``config.compilation_cache`` (on by default): a run keeps its compiled programs in
    ``<cache_dir>/compiled``, where the next run with the same shapes loads them; off, none
    are kept. A cache folder set by the user (here: the test session's) takes precedence."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    for setting in ("on", "off"):
        cache = tmp_path / setting
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_AFTER_START_RUN, str(cache), setting],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        kept = list((cache / "compiled").glob("jit_*")) if (cache / "compiled").exists() else []
        if setting == "on":
            assert done.stdout.split()[-1] == str(cache / "compiled") and len(kept) == 1
        else:
            assert done.stdout.split()[-1] == "None" and not kept
    session_cache = jax.config.jax_compilation_cache_dir
    assert session_cache and use_compilation_cache(tmp_path / "other") == session_cache
    assert jax.config.jax_compilation_cache_dir == session_cache


def test_resume_after_stop_equals_uninterrupted_run(config, tmp_path):
    config.max_train_molecules = 48  # 3 steps per epoch
    config.num_epochs = 2
    config.checkpoint_every_steps = 2
    train_and_evaluate(config, tmp_path / "straight")
    config.max_steps = 4  # stop in the middle of epoch 2 ...
    assert train_and_evaluate(config, tmp_path / "resumed")["step"] == 4
    assert steps_logged(tmp_path / "resumed")[-1] == 4  # the last step's loss is logged before stopping
    config.max_steps = 0  # ... and restart in the same workdir
    assert train_and_evaluate(config, tmp_path / "resumed")["step"] == 6
    straight, resumed = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def two_batches_and_combined(config, qm9_subset):
    """Two 8-molecule batches, and the same 16 molecules as one batch (bigger budget)."""
    idx = qm9_subset.splits["train"][:16]
    small, large = budget_for(qm9_subset, idx, 16), budget_for(qm9_subset, idx, 32)
    pad = lambda ids, budget: pad_to_budget(qm9_subset.batch_graphs(ids), budget)
    as32 = lambda g: jax.tree.map(lambda x: x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int32), g)
    a, b, both = as32(pad(idx[:8], small)), as32(pad(idx[8:], small)), as32(pad(idx, large))
    stacked = jax.tree.map(lambda x, y: np.stack([x, y]), a, b)
    return stacked, both


@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs 2 (simulated) devices")
def test_two_devices_equal_one_device_on_the_combined_batch(config, two_batches_and_combined):
    stacked, combined = two_batches_and_combined
    model = build_model(config)
    optimizer = optax.sgd(0.1)  # linear in the gradient: compares gradients, not Adam's sign()
    state = create_train_state(model, optimizer, combined, jax.random.PRNGKey(0))

    def run(num_devices, batch):
        parallel = DataParallel(model, num_devices)
        assert parallel.num_devices == num_devices
        new_state, metrics = parallel.train_step(parallel.put_replicated(state), parallel.put_batch(batch))
        return parallel.get(new_state).params, parallel.get(metrics)

    one, m1 = run(1, combined)
    two, m2 = run(2, stacked)
    assert float(m1["num_graphs"]) == float(m2["num_graphs"]) == 16
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    moved = 0.0
    for p1, p2, p0 in zip(*map(jax.tree.leaves, (one, two, state.params))):
        np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-7)  # same update, reordered sums
        moved = max(moved, float(np.abs(p1 - p0).max()))
    assert moved > 1e-4  # the step really changed the parameters


@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs 2 (simulated) devices")
def test_two_device_training_with_precomputed_bases_equals_training_without(config, qm9_subset, tmp_path, monkeypatch):
    """The training loop on two devices, once computing the edge harmonics in the model and
    once reading them precomputed from the dataset: the batches carry them only when asked,
    and both runs train the same parameters."""
    dataset_type = type(qm9_subset)
    batch_graphs = dataset_type.batch_graphs
    carried = []  # per assembled batch: did it carry precomputed harmonics?

    def spy(self, *args, **kwargs):
        graphs = batch_graphs(self, *args, **kwargs)
        carried.append(HARMONICS in graphs.edges)
        return graphs

    monkeypatch.setattr(dataset_type, "batch_graphs", spy)
    config.num_devices = 2
    config.max_train_molecules, config.max_eval_molecules, config.num_epochs = 64, 40, 1  # 2 steps of 2 x 16
    results, params = {}, {}
    for precompute in (False, True):
        config.precompute_bases = precompute
        carried.clear()
        results[precompute] = train_and_evaluate(config, tmp_path / str(precompute))
        params[precompute] = final_params(tmp_path / str(precompute))
        assert carried and all(c == precompute for c in carried), (precompute, carried)
    assert results[True]["step"] == results[False]["step"] == 2
    for key in ("val_mae", "test_mae"):
        assert np.isfinite(results[False][key])
        np.testing.assert_allclose(results[True][key], results[False][key], rtol=1e-4)
    for with_bases, without in zip(jax.tree.leaves(params[True]), jax.tree.leaves(params[False])):
        # Adam moves every weight by about lr = 3e-3 a step; rounding moved one by 1.7e-6 (measured)
        np.testing.assert_allclose(with_bases, without, rtol=1e-4, atol=1e-5)


def test_fp16_loss_scaling_skips_overflowing_steps(config, two_batches_and_combined):
    _, batch = two_batches_and_combined
    config.precision = "fp16"
    model = build_model(config)
    optimizer = optax.adam(1e-3)
    state = create_train_state(model, optimizer, batch, jax.random.PRNGKey(0), loss_scaling=True)
    step = jax.jit(make_train_step(model))
    good, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert any(
        float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(state.params))
    )
    # an absurd scale overflows fp16 gradients: the step is skipped and the scale halved
    huge = state.replace(loss_scale=dataclasses.replace(state.loss_scale, scale=jnp.float32(3e38)))
    skipped, _ = step(huge, batch)
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert float(skipped.loss_scale.scale) == pytest.approx(1.5e38)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("batchsize", 4, "unknown config key 'batchsize'; did you mean 'batch_size'"),
        ("task", "homo_lumo", "unknown task 'homo_lumo'; valid tasks: mu, alpha, homo"),
        ("precision", "fp8", "config.precision='fp8' is not one of"),
        ("batch_size", 0, "config.batch_size must be positive"),
        ("log_every_steps", 50, "must be <= 10"),
    ],
)
def test_bad_configs_are_rejected_clearly(config, key, value, message):
    with config.unlocked():
        config[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config)


def test_cli_rejects_a_config_typo():
    result = subprocess.run(
        [
            sys.executable,
            "train/main.py",
            "--config",
            "configs/test.py",
            "--config.batchsize=4",
            "--workdir",
            "/nonexistent/never/created",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "batchsize" in result.stderr
    assert not Path("/nonexistent/never/created").exists()


def test_background_saves_keep_the_saved_values_while_training_donates_the_state(tmp_path):
    """Saves are written while the next steps run; those steps donate (overwrite) the state's
    buffers, so each checkpoint must hold the values of its own step, not later ones."""
    step_fn = jax.jit(lambda s: jax.tree.map(lambda x: x + 1.0, s), donate_argnums=0)
    state = {"params": jnp.zeros(1_000_000), "opt": {"mu": jnp.ones(1_000_000)}}
    checkpointer = Checkpointer(tmp_path, keep=5)
    for step in range(1, 4):
        state = step_fn(state)
        checkpointer.save(step, state, {"epoch": step})
    for _ in range(5):  # training goes on while the last save may still be writing
        state = step_fn(state)
    checkpointer.close()
    reopened = Checkpointer(tmp_path, keep=5)
    for step in range(1, 4):
        restored, meta = reopened.restore(state, step=step)
        assert meta["epoch"] == step
        np.testing.assert_array_equal(restored["params"], np.full(1_000_000, float(step)))
        np.testing.assert_array_equal(restored["opt"]["mu"], np.full(1_000_000, 1.0 + step))
    assert reopened.latest_step() == 3
    reopened.close()


def test_corrupt_checkpoint_gives_a_clear_error(config, trained_workdir, tmp_path):
    workdir = shutil.copytree(trained_workdir, tmp_path / "run")  # its config: 32 molecules, 3 steps
    for f in (workdir / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"garbage")
    config.max_train_molecules, config.max_steps = 32, 4
    with pytest.raises(CheckpointError, match="cannot be restored.*corrupt"):
        train_and_evaluate(config, workdir)


def test_plot_metrics_renders_learning_curves(trained_workdir, tmp_path):
    out = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(trained_workdir), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    missing = subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0 and "metrics.jsonl not found" in missing.stderr


def test_ctrl_c_and_sigterm_save_the_exact_position_and_the_rerun_resumes(qm9_subset_cache, tmp_path):
    """Ctrl-C (SIGINT), then a scheduler's preemption (SIGTERM) of the resumed run: each signal
    is turned into a stop between steps, the state saved is the last finished step's (never
    one donated to a step in flight), and the rerun resumes at the saved position."""
    args = [
        sys.executable,
        "train/main.py",
        "--config",
        "configs/test.py",
        "--workdir",
        str(tmp_path),
        f"--config.cache_dir={qm9_subset_cache}",
        "--config.checkpoint_every_steps=100000",
        "--config.log_every_steps=1",
        "--config.num_epochs=50",
    ]  # ~19 steps per epoch
    resumed_from = None
    for signal_name in ("SIGINT", "SIGTERM"):
        logged = len(steps_logged(tmp_path)) if resumed_from else 0
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wanted = logged + 3  # this run trains at least 3 steps before the signal
        deadline = time.time() + 300
        while time.time() < deadline and not (
            (tmp_path / "metrics.jsonl").exists() and len(steps_logged(tmp_path)) >= wanted
        ):
            time.sleep(0.2)
        proc.send_signal(getattr(signal, signal_name))
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0 and f"{signal_name} received" in stderr, stderr[-3000:]
        assert "interrupted: checkpoint saved at step" in stderr
        step, meta = saved_position(tmp_path)
        if resumed_from is not None:  # this run resumed where the previous signal left it
            assert f"resuming at step {resumed_from[0]} (epoch {resumed_from[1]}, batch {resumed_from[2]})" in stderr
        assert step >= (resumed_from[0] if resumed_from else 0) + 3
        assert (meta["epoch"], meta["batch"]) == position_after(step, qm9_subset_cache)
        resumed_from = (step, meta["epoch"], meta["batch"])
    # over both runs each step is logged once, up to the last one saved (a rerun resumes from
    # the saved position whichever signal saved it: the same code after the stop)
    logged = steps_logged(tmp_path)
    assert logged == sorted(set(logged)) and logged[-1] >= step


def saved_position(workdir: Path) -> tuple[int, dict]:
    """The newest checkpoint's step and its saved data position."""
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = manager.latest_step()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    manager.close()
    return step, meta


def steps_logged(workdir: Path) -> list[int]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train_loss" in r]


def position_after(step: int, cache_dir) -> tuple[int, int]:
    """(epoch, batch) of the next batch after ``step`` steps of configs/test.py, from the
    number of batches the loader packs in each epoch (epochs may differ in length)."""
    from se3jax.data.qm9 import load_qm9

    config = load_config_file(REPO / "configs" / "test.py")
    dataset = load_qm9(cache_dir, config.task, config.max_molecules)
    idx = np.concatenate([dataset.splits[s] for s in ("train", "val", "test")])
    loader = BatchLoader(
        dataset,
        dataset.splits["train"],
        config.batch_size,
        budget_for(dataset, idx, config.batch_size),
        seed=config.seed,
    )
    epoch = 0
    while step >= loader.num_batches(epoch):
        step -= loader.num_batches(epoch)
        epoch += 1
    return epoch, step
