"""The training loop's parts alone, with hand-computed expectations: the loss, the metrics
window, the batch stream from a saved position, the schedule length, and the workdir rules
(resuming under a changed config, metrics logged once per step)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.training import workdir as files
from se3jax.training.loop import MetricsWindow, Position, canonical, training_batches
from se3jax.training.steps import masked_l1

REPO = Path(__file__).resolve().parents[1]


def test_masked_l1_sums_real_graphs_only():
    predictions = jnp.array([1.0, -2.0, 0.5, 100.0])
    targets = jnp.array([0.0, 1.0, 0.5, 0.0])
    total, count = masked_l1(predictions, targets, jnp.array([True, True, True, False]))
    assert float(total) == 1.0 + 3.0 + 0.0 and float(count) == 3.0  # the padding graph is ignored


def test_metrics_window_means_over_molecules_and_keeps_the_newest_in_flight():
    window = MetricsWindow(fetch=lambda x: x)
    window.add({"loss": 1.0, "num_graphs": 10.0})
    window.add({"loss": 4.0, "num_graphs": 30.0})
    window.add({"loss": 100.0, "num_graphs": 5.0})
    m = window.flush(keep_newest=True)  # the last step is not fetched yet
    assert m["loss"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40) and m["molecules"] == 40
    m = window.flush()
    assert m["loss"] == 100.0 and m["molecules"] == 5 and m["molecules_per_s"] > 0
    assert window.flush() is None  # nothing left: no empty row


class Loader:
    """Epochs of 2, 3 and 2 batches; batch k of epoch e is (e, k)."""

    lengths = (2, 3, 2)
    closed = 0

    def num_batches(self, epoch):
        return self.lengths[epoch]

    def epoch_batches(self, epoch, start):
        loader = self

        class Batches:
            def __iter__(self):
                return iter([(epoch, k) for k in range(start, loader.lengths[epoch])])

            def close(self):
                loader.closed += 1

        return Batches()


@pytest.mark.parametrize(
    "start,expected_first,count",
    [(Position(0, 0), (0, 0), 7), (Position(1, 2), (1, 2), 3), (Position(0, 2), (1, 0), 5), (Position(3, 0), None, 0)],
)
def test_training_batches_resume_from_any_position(start, expected_first, count):
    loader = Loader()
    items = list(training_batches(loader, start, num_epochs=3, put=lambda b: ("on device", b)))
    assert len(items) == count
    for position, batch, last in items:
        assert batch == ("on device", tuple(position))
        assert last == (position.batch + 1 == loader.lengths[position.epoch])
    if items:
        assert tuple(items[0][0]) == expected_first
    assert canonical(Position(1, 3), loader.num_batches) == Position(2, 0)


def test_schedule_length_counts_every_epochs_batches(qm9_subset):
    """Epochs pack different numbers of batches: the cosine schedule spans their sum."""
    from se3jax.data.loader import BatchLoader
    from se3jax.graphs import PaddingBudget

    idx = qm9_subset.splits["train"]
    stats = qm9_subset.stats(idx)  # a budget for 16 average molecules: big ones close batches early
    budget = PaddingBudget(int(16 * stats["mean_nodes"]) + 1, 2 * int(8 * stats["mean_edges"]), 17)
    loader = BatchLoader(qm9_subset, idx, 16, budget, seed=0)
    lengths = [loader.num_batches(e) for e in range(6)]
    assert 6 * lengths[0] != sum(lengths), lengths  # the premise: packing varies with the shuffle
    from se3jax.training.config import load_config_file
    from se3jax.training.train import learning_rate_schedule, total_training_steps

    config = load_config_file(REPO / "configs" / "test.py")
    config.num_epochs = 6
    assert total_training_steps(loader, config.num_epochs) == sum(lengths)
    lr = learning_rate_schedule(config, sum(lengths))
    floor = config.learning_rate * config.final_learning_rate_factor
    # the learning rate reaches its floor exactly after the last step of the last epoch
    assert float(lr(sum(lengths))) == pytest.approx(floor)
    assert float(lr(sum(lengths) - 1)) > floor


def test_resuming_under_a_changed_config_is_refused(tmp_path):
    saved = {"seed": 0, "batch_size": 16, "num_epochs": 2, "log_every_steps": 5}
    files.save_json(tmp_path / files.CONFIG_FILE, saved)
    (tmp_path / files.CHECKPOINT_DIR / "4").mkdir(parents=True)
    files.check_resumable(tmp_path, {**saved, "num_epochs": 10, "log_every_steps": 1})  # safe
    files.save_json(tmp_path / files.CONFIG_FILE, {**saved, "parallel": "pmap"})  # a retired option
    files.check_resumable(tmp_path, saved)
    with pytest.raises(ValueError, match=r"batch_size: 16 -> 32, seed: 0 -> 1.*new workdir"):
        files.check_resumable(tmp_path, {**saved, "seed": 1, "batch_size": 32})
    (tmp_path / files.CHECKPOINT_DIR / "4").rmdir()  # no checkpoint: any config may start
    files.check_resumable(tmp_path, {**saved, "seed": 1})


def test_metrics_after_the_restored_step_are_dropped(tmp_path):
    rows = [{"step": s, "train_loss": 1.0 / s} for s in (2, 4, 6, 8)] + [{"step": 4, "val_mae": 0.5}]
    (tmp_path / files.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert files.drop_metrics_after(tmp_path, 4) == 2
    kept = [json.loads(line) for line in (tmp_path / files.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in kept] == [2, 4, 4]
    assert files.drop_metrics_after(tmp_path / "missing", 1) == 0
    np.testing.assert_equal(files.config_changes({"a": 1, "b": 2}, {"a": 1, "c": 3}), ["b", "c"])


def test_warmup_then_cosine_schedule():
    from se3jax.training.config import load_config_file
    from se3jax.training.train import learning_rate_schedule

    config = load_config_file(REPO / "configs" / "test.py")
    config.num_epochs, config.warmup_epochs = 10, 2.0
    lr = learning_rate_schedule(config, 1000)  # 100 steps per epoch: 200 of warm-up
    assert float(lr(0)) == 0.0 and float(lr(100)) == pytest.approx(config.learning_rate / 2)
    assert float(lr(200)) == pytest.approx(config.learning_rate)
    assert float(lr(1000)) == pytest.approx(config.learning_rate * config.final_learning_rate_factor)


def test_exponential_moving_average_of_the_weights(qm9_subset):
    import jax
    import optax

    from se3jax.data.loader import budget_for
    from se3jax.graphs import pad_to_budget
    from se3jax.model import SE3TransformerPooled
    from se3jax.training.steps import create_train_state, make_train_step

    idx = qm9_subset.splits["train"][:8]
    batch = pad_to_budget(qm9_subset.batch_graphs(idx), budget_for(qm9_subset, idx, 8))
    model = SE3TransformerPooled(num_layers=1, num_degrees=2, num_channels=8, num_heads=2)
    optimizer = optax.sgd(0.1)
    state = create_train_state(model, optimizer, batch, jax.random.PRNGKey(0), ema_decay=0.75)
    assert state.eval_params is state.ema_params
    new = jax.jit(make_train_step(model))(state, batch)[0]
    for ema, old, params in zip(*map(jax.tree.leaves, (new.ema_params, state.params, new.params))):
        np.testing.assert_allclose(ema, 0.75 * old + 0.25 * params, rtol=1e-6, atol=1e-7)
    assert any(
        float(jnp.abs(p - o).max()) > 0 for p, o in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))
    )


def test_a_finished_run_is_recognised_only_when_a_rerun_would_change_nothing(tmp_path):
    config = {"num_epochs": 4, "max_eval_molecules": 0, "seed": 0}
    results = {"step": 12, "val_mae": 0.5, "test_mae": 0.25}
    (tmp_path / files.CHECKPOINT_DIR / "12").mkdir(parents=True)
    assert files.finished_results(tmp_path, config) is None  # trained, but not finished
    files.save_results(tmp_path, results, config)
    assert files.finished_results(tmp_path, config) == results
    assert files.finished_results(tmp_path, {**config, "num_epochs": 3, "seed": 1}) == results  # nothing to train
    assert files.finished_results(tmp_path, {**config, "num_epochs": 5}) is None  # one more epoch to train
    assert files.finished_results(tmp_path, {**config, "max_eval_molecules": 40}) is None  # another test subset
    (tmp_path / files.CHECKPOINT_DIR / "15.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    assert files.finished_results(tmp_path, config) == results
    (tmp_path / files.CHECKPOINT_DIR / "15").mkdir()  # trained further since the results
    assert files.finished_results(tmp_path, config) is None


def test_metrics_writer_opens_its_files_at_the_first_row(tmp_path):
    """A resumed run drops the rows after its checkpoint before writing: a writer that had
    opened the file earlier would append to the replaced (unlinked) file."""
    rows = [{"step": s, "train_loss": 1.0} for s in (2, 4, 6)]
    (tmp_path / files.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = files.MetricsWriter(tmp_path, enabled=True)
    files.drop_metrics_after(tmp_path, 4)
    writer.write(5, train_loss=0.5)
    writer.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / files.METRICS_FILE).read_text().splitlines()]
    assert steps == [2, 4, 5]


def test_the_config_takes_its_execution_and_model_keys_from_the_classes():
    """One definition: the config's execution keys, defaults, choices and help are Execution's
    fields; its model defaults are the model's."""
    import dataclasses

    from se3jax.execution import Execution
    from se3jax.model import SE3TransformerPooled
    from se3jax.training.config import config_help, default_config, execution_from_config, validate_config

    config, help_text = default_config(), config_help()
    for field in dataclasses.fields(Execution):
        if field.name == "mode":  # set by the code (training or inference), not a config key
            assert field.name not in config
            continue
        assert config[field.name] == field.default and f"--config.{field.name}=" in help_text
        assert field.metadata["doc"] in help_text
    assert execution_from_config(config, "infer") == Execution(mode="infer")
    model = SE3TransformerPooled()
    assert (config.num_layers, config.num_channels, config.self_interaction) == (
        model.num_layers,
        model.num_channels,
        model.self_interaction,
    )
    config.update(task="homo", kernel="cuda")
    with pytest.raises(
        ValueError, match=r"config.kernel='cuda' is not one of \('auto', 'xla', 'xla_channels_last', 'pallas'\)"
    ):
        validate_config(config)
    config.update(kernel="auto", edge_chunk=-1)
    with pytest.raises(ValueError, match="edge_chunk >= 0"):
        validate_config(config)
