"""``train_and_evaluate(config, workdir)``: QM9 training with evaluation, checkpoints that
resume exactly, metrics as JSON lines and TensorBoard events, all outputs in ``workdir``
(layout in :mod:`se3jax.training.workdir`).

:func:`train_and_evaluate` reads top to bottom: start (config checks, distributed runtime,
workdir), stop at once if the workdir holds a finished run, data, model and state (restored if
the workdir has a checkpoint), then :func:`train_steps` over the training batches from the saved
position with logging, evaluation and checkpoints at their cadences, and the test split once at
the end. The parts that stay fixed while training are one :class:`Run`; the state and the step
are passed explicitly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from se3jax.compilation_cache import use_compilation_cache
from se3jax.data.domain import TrainingDomain
from se3jax.data.loader import BatchLoader, budget_for, precompute_edge_harmonics
from se3jax.data.qm9 import DEFAULT_CACHE_DIR, QM9Dataset, load_qm9
from se3jax.graphs import pad_to_budget
from se3jax.host_memory import compile_and_release
from se3jax.model import SE3TransformerPooled
from se3jax.precision import get_policy
from se3jax.training import workdir as files
from se3jax.training.checkpoints import Checkpointer
from se3jax.training.config import model_kwargs, validate_config
from se3jax.training.loop import MetricsWindow, Position, ShapeWatch, StopSignals, canonical, training_batches
from se3jax.training.parallel import DataParallel, check_processes_agree, initialize_distributed, mesh_devices
from se3jax.training.steps import create_train_state


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """Cosine decay from lr to lr * factor over the run's true number of steps (the sum of
    every epoch's batches: epochs may pack different numbers), after a linear warm-up over
    ``warmup_epochs`` worth of those steps (none in the reference recipe)."""
    total = max(total_steps, 1)
    warmup = int(round(total * config.warmup_epochs / config.num_epochs))
    final = config.learning_rate * config.final_learning_rate_factor
    if warmup == 0:
        return optax.cosine_decay_schedule(
            config.learning_rate, decay_steps=total, alpha=config.final_learning_rate_factor
        )
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total, end_value=final)


def total_training_steps(loader: BatchLoader, num_epochs: int) -> int:
    """Steps of the whole run: every epoch's packed batches (device groups) summed."""
    return sum(loader.num_batches(epoch) for epoch in range(num_epochs))


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on :func:`learning_rate_schedule`."""
    return optax.adamw(learning_rate_schedule(config, total_steps), weight_decay=config.weight_decay)


def build_model(config) -> SE3TransformerPooled:
    return SE3TransformerPooled(**model_kwargs(config))


def load_dataset(config) -> QM9Dataset:
    """The config's QM9 data: only the molecules the run uses (``max_train_molecules``,
    ``max_eval_molecules``) are loaded, processed on the first run (load_qm9's split_limits)."""
    limits = {"train": config.max_train_molecules, "val": config.max_eval_molecules, "test": config.max_eval_molecules}
    dataset = load_qm9(
        config.cache_dir or DEFAULT_CACHE_DIR, config.task, config.max_molecules or None, split_limits=limits
    )
    if config.precompute_bases:
        start = time.perf_counter()
        dataset.edge_harmonics = precompute_edge_harmonics(dataset, config.num_degrees - 1)
        seconds = time.perf_counter() - start
        logging.info(
            "precomputed edge harmonics in %.1f s (%.0f MB in host RAM)", seconds, dataset.edge_harmonics.nbytes / 1e6
        )
    return dataset


def build_loaders(config, dataset: QM9Dataset) -> tuple[BatchLoader, dict[str, BatchLoader]]:
    """The training loader and the validation/test loaders of this process: one padding
    budget for all, each process feeding its own devices."""
    limit = lambda name, k: dataset.splits[name][:k] if k else dataset.splits[name]
    train_idx = limit("train", config.max_train_molecules)
    eval_idx = {name: limit(name, config.max_eval_molecules) for name in ("val", "test")}
    budget = budget_for(dataset, np.concatenate([train_idx, *eval_idx.values()]), config.batch_size)
    local_devices = [d for d in mesh_devices(config.num_devices) if d.process_index == jax.process_index()]
    common = dict(
        budget=budget,
        num_devices=len(local_devices),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train = BatchLoader(dataset, train_idx, config.batch_size, shuffle=True, seed=config.seed, **common)
    evaluation = {
        name: BatchLoader(dataset, idx, config.batch_size, shuffle=False, **common)
        for name, idx in eval_idx.items()
        if len(idx)
    }
    return train, evaluation


def evaluate(parallel: DataParallel, params, loader: BatchLoader, std: float) -> float:
    """MAE over the loader's molecules in the target's unit: exact sums of errors and counts,
    over every process's shards."""
    total, count = 0.0, 0.0
    for _, batch, _ in training_batches(loader, Position(0, 0), 1, parallel.put_batch):
        out = parallel.get(parallel.eval_step(params, batch))
        total += float(out["abs_error_sum"])
        count += float(out["num_graphs"])
    return total / max(count, 1.0) * std


@dataclasses.dataclass(frozen=True)
class Run:
    """What stays fixed while one run trains: its config, data, devices and outputs."""

    config: ml_collections.ConfigDict
    dataset: QM9Dataset
    train_loader: BatchLoader
    eval_loaders: dict[str, BatchLoader]
    parallel: DataParallel
    checkpointer: Checkpointer
    writer: files.MetricsWriter
    is_main: bool

    def save(self, step: int, state, next_position: Position) -> None:
        """Checkpoint ``state`` after ``step`` with the position of the next batch."""
        meta = {"epoch": next_position.epoch, "batch": next_position.batch, "seed": self.config.seed}
        self.checkpointer.save(step, state, meta)

    def evaluate(self, split: str, step: int, state, **extra) -> dict[str, float]:
        """``{"<split>_mae": MAE}`` of ``state``'s evaluation parameters, also written to the
        metrics at ``step`` (with ``extra``); empty when the run has no such split."""
        if split not in self.eval_loaders:
            return {}
        mae = evaluate(self.parallel, state.eval_params, self.eval_loaders[split], self.dataset.target_std)
        self.writer.write(step, **{f"{split}_mae": mae}, **extra)
        return {f"{split}_mae": mae}


def start_run(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Checks before any work (the config, the distributed runtime, every process's agreement,
    whether the workdir may resume under this config), then the config saved in the workdir.
    ``config.compilation_cache``: compiled steps are kept under ``<cache_dir>/compiled``."""
    validate_config(config)
    if config.compilation_cache:
        use_compilation_cache(config.cache_dir or DEFAULT_CACHE_DIR)
    initialize_distributed(config)
    check_processes_agree(config.to_dict())
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    files.check_resumable(workdir, config.to_dict())
    if jax.process_index() == 0:
        files.save_json(workdir / files.CONFIG_FILE, config.to_dict())
    return workdir


def initial_state(config, model, optimizer, dataset: QM9Dataset, loader: BatchLoader, parallel, checkpointer):
    """``(state, position of the next batch)``: the newest checkpoint's, else a fresh state
    initialised from ``config.seed`` (shapes from the first training batch), on the devices."""
    first = pad_to_budget(dataset.batch_graphs(loader.plan(0)[0][0]), loader.budget)
    state = create_train_state(
        model,
        optimizer,
        first,
        jax.random.PRNGKey(config.seed),
        loss_scaling=get_policy(config.precision).needs_loss_scaling,
        ema_decay=config.ema_decay,
    )
    state = parallel.put_replicated(state)
    restored = checkpointer.restore(state)
    if restored is None:
        return state, Position(0, 0)
    state, meta = restored
    start = Position(meta["epoch"], meta["batch"])
    logging.info("resuming at step %d (epoch %d, batch %d)", int(parallel.get(state.step)), *start)
    return state, start


def log_start(run: Run, state, total_steps: int) -> None:
    loaders, parallel = run.eval_loaders, run.parallel
    logging.info(
        "QM9 %s: %d train / %d val / %d test molecules, %d parameters, %d steps in %d epochs "
        "(epoch 0: %d steps) on %d device(s) in %d process(es), padding budget %s",
        run.dataset.task,
        len(run.train_loader.indices),
        *(len(loaders[n].indices) if n in loaders else 0 for n in ("val", "test")),
        sum(x.size for x in jax.tree.leaves(parallel.get(state.params))),
        total_steps,
        run.config.num_epochs,
        run.train_loader.num_batches(0),
        parallel.num_devices,
        jax.process_count(),
        run.train_loader.budget,
    )


def log_training(run: Run, bar: tqdm, window: MetricsWindow, step: int, position: Position, flush_all: bool):
    """At the logging cadence: the window's means to the metrics and the progress bar. Between
    cadences the newest step stays in flight; ``flush_all`` (an epoch's end, or the run stopping
    here) waits for it, so every trained step is logged."""
    if not (step % run.config.log_every_steps == 0 or flush_all):
        return
    m = window.flush(keep_newest=not flush_all)
    if m is None:
        return
    std, unit = run.dataset.target_std, run.dataset.unit
    bar.set_postfix(
        loss=f"{m['loss']:.4f}",
        mae=f"{m['loss'] * std:.4g} {unit}",
        mol_s=f"{m['molecules_per_s']:.1f}",
        epoch=position.epoch + 1,
    )
    run.writer.write(
        step,
        train_loss=m["loss"],
        train_mae=m["loss"] * std,
        molecules_per_s=m["molecules_per_s"],
        epoch=position.epoch,
    )


def validate(run: Run, step: int, state, position: Position, last_in_epoch: bool) -> dict[str, float]:
    """Validation at its cadences (every ``eval_every_steps`` steps, every ``eval_every_epochs``
    epochs): ``{"val_mae": ...}``, or empty when not due."""
    config, results = run.config, {}
    if config.eval_every_steps and step % config.eval_every_steps == 0:
        results = run.evaluate("val", step, state)
    epochs_done = position.epoch + 1
    if last_in_epoch and epochs_done % config.eval_every_epochs == 0:
        results = run.evaluate("val", step, state, epoch=epochs_done)
        if run.is_main and results:
            tqdm.write(f"epoch {epochs_done}: validation MAE {results['val_mae']:.5g} {run.dataset.unit}")
    return results


def train_steps(
    run: Run, state, step: int, start: Position, total_steps: int, hooks: Sequence[Callable] = ()
) -> tuple[Any, int, dict[str, float], bool]:
    """Train from ``start`` to the end of the last epoch, or to ``max_steps``, logging,
    validating and checkpointing at their cadences; a signal (Ctrl-C, SIGTERM) saves the last
    finished step and raises ``KeyboardInterrupt``. Returns ``(state, step, latest validation,
    whether every epoch is done)``."""
    config, results = run.config, {}
    if config.max_steps and step >= config.max_steps:
        logging.info("step %d already reaches max_steps=%d", step, config.max_steps)
        return state, step, results, False
    window, shapes = MetricsWindow(fetch=run.parallel.get), ShapeWatch("the train step")
    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress_bar and run.is_main), dynamic_ncols=True)
    batches = training_batches(run.train_loader, start, config.num_epochs, run.parallel.put_batch)
    try:
        with StopSignals() as signals:
            for position, batch, last_in_epoch in batches:
                if shapes.check(batch):  # first inputs or new shapes: compile before the call
                    train_step = compile_and_release(run.parallel.train_step, state, batch)
                state, metrics = train_step(state, batch)
                step += 1
                window.add(metrics)
                bar.update(1)
                for hook in hooks:
                    hook(step, state, position)
                stop = bool(config.max_steps) and step >= config.max_steps
                # read once: a signal arriving later in this step is handled after the next
                # one, never between the decision to save and the decision to stop
                interrupted = signals.requested
                log_training(run, bar, window, step, position, last_in_epoch or stop or interrupted)
                results.update(validate(run, step, state, position, last_in_epoch))
                if step % config.checkpoint_every_steps == 0 or last_in_epoch or stop or interrupted:
                    next_position = Position(position.epoch, position.batch + 1)
                    run.save(step, state, canonical(next_position, run.train_loader.num_batches))
                if stop:
                    logging.info("stopping at max_steps=%d", config.max_steps)
                    return state, step, results, False
                if interrupted:  # Ctrl-C or SIGTERM: saved where we stand, now stop
                    logging.warning("interrupted: checkpoint saved at step %d", step)
                    raise KeyboardInterrupt
    finally:
        bar.close()
    return state, step, results, True


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    dataset: QM9Dataset | None = None,
    hooks: Sequence[Callable] = (),
) -> dict:
    """Train on the QM9 train split, evaluate on validation during training and on test at the
    end. Restarting with the same ``workdir`` resumes from the last checkpoint at the exact
    batch it stopped at; restarting a finished run reports its stored results (nothing is
    trained or evaluated again). ``dataset``: a loaded dataset (default: the one the config
    names). ``hooks``: callables ``hook(step, state, position)`` run after every step
    (``position``: the batch just trained). Returns the final metrics (MAE in the target's
    unit) and the step."""
    workdir = start_run(config, workdir)
    finished = files.finished_results(workdir, config.to_dict())
    if finished is not None:
        logging.info("%s holds a finished run; its results (not evaluated again): %s", workdir, finished)
        return finished
    is_main = jax.process_index() == 0
    dataset = dataset if dataset is not None else load_dataset(config)
    if is_main:
        files.save_json(workdir / files.NORMALISATION_FILE, dataset.normalisation.to_json())
    train_loader, eval_loaders = build_loaders(config, dataset)
    if is_main:  # what inference warns outside of
        domain = TrainingDomain.of_molecules(dataset, train_loader.indices)
        files.save_json(workdir / files.DOMAIN_FILE, domain.to_json())
    model, total_steps = build_model(config), total_training_steps(train_loader, config.num_epochs)
    optimizer = make_optimizer(config, total_steps)
    parallel = DataParallel(model, config.num_devices)
    checkpointer = Checkpointer(workdir / files.CHECKPOINT_DIR, keep=config.keep_checkpoints)
    writer = files.MetricsWriter(workdir, enabled=is_main)  # opens its files at the first row
    run = Run(config, dataset, train_loader, eval_loaders, parallel, checkpointer, writer, is_main)
    try:
        state, start = initial_state(config, model, optimizer, dataset, train_loader, parallel, checkpointer)
        step = int(parallel.get(state.step))
        if is_main:
            files.drop_metrics_after(workdir, step)
        log_start(run, state, total_steps)
        state, step, results, all_epochs_done = train_steps(run, state, step, start, total_steps, hooks)
        if not all_epochs_done:
            return {"step": step, **results}
        results = {"step": step, **results, **run.evaluate("test", step, state)}
        if is_main:
            if "test_mae" in results:
                tqdm.write(f"test MAE {results['test_mae']:.5g} {dataset.unit}")
            files.save_results(workdir, results, config.to_dict())
        return results
    finally:
        writer.close()
        checkpointer.close()
