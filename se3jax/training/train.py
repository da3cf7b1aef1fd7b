"""``train_and_evaluate(config, workdir)``: QM9 training with evaluation, checkpoints that
resume exactly, metrics as JSON lines and TensorBoard events, all outputs in ``workdir``
(layout in :mod:`se3jax.training.workdir`).

The loop reads top to bottom: start (distributed runtime, config checks), data, model and
state (restored if the workdir has a checkpoint), then one pass over the training batches
from the saved position with logging, evaluation and checkpoints at their cadences.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from se3jax.data.domain import TrainingDomain
from se3jax.data.loader import BatchLoader, budget_for, precompute_edge_harmonics
from se3jax.data.qm9 import DEFAULT_CACHE_DIR, QM9Dataset, load_qm9
from se3jax.graphs import pad_to_budget
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


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    dataset: QM9Dataset | None = None,
    hooks: Sequence[Callable] = (),
) -> dict:
    """Train on the QM9 train split, evaluate on validation during training and on test at the
    end. Restarting with the same ``workdir`` resumes from the last checkpoint at the exact
    batch it stopped at. ``dataset``: a loaded dataset (default: the one the config names).
    ``hooks``: callables ``hook(step, state, position)`` run after every step (``position``:
    the batch just trained). Returns the final metrics (MAE in the target's unit)."""
    validate_config(config)
    initialize_distributed(config)
    check_processes_agree(config.to_dict())
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    files.check_resumable(workdir, config.to_dict())
    is_main = jax.process_index() == 0
    if is_main:
        files.save_json(workdir / files.CONFIG_FILE, config.to_dict())

    # data
    dataset = dataset if dataset is not None else load_dataset(config)
    if is_main:
        files.save_json(workdir / files.NORMALISATION_FILE, dataset.normalisation.to_json())
    train_loader, eval_loaders = build_loaders(config, dataset)
    if is_main:  # what inference warns outside of
        domain = TrainingDomain.of_molecules(dataset, train_loader.indices)
        files.save_json(workdir / files.DOMAIN_FILE, domain.to_json())

    # model, state and devices
    model = build_model(config)
    total_steps = total_training_steps(train_loader, config.num_epochs)
    optimizer = make_optimizer(config, total_steps)
    parallel = DataParallel(model, optimizer, config.num_devices)
    first = pad_to_budget(dataset.batch_graphs(train_loader.plan(0)[0][0]), train_loader.budget)  # for shapes
    state = create_train_state(
        model,
        optimizer,
        first,
        jax.random.PRNGKey(config.seed),
        loss_scaling=get_policy(config.precision).needs_loss_scaling,
        ema_decay=config.ema_decay,
    )
    state = parallel.put_replicated(state)
    checkpointer = Checkpointer(workdir / files.CHECKPOINT_DIR, keep=config.keep_checkpoints)
    start = Position(0, 0)
    restored = checkpointer.restore(state)
    if restored is not None:
        state, meta = restored
        start = Position(meta["epoch"], meta["batch"])
        logging.info("resuming at step %d (epoch %d, batch %d)", int(parallel.get(state.step)), *start)
    step = int(parallel.get(state.step))
    if is_main:
        files.drop_metrics_after(workdir, step)
    logging.info(
        "QM9 %s: %d train / %d val / %d test molecules, %d parameters, %d steps in %d epochs "
        "(epoch 0: %d steps) on %d device(s) in %d process(es), padding budget %s",
        dataset.task,
        len(train_loader.indices),
        *(len(eval_loaders[n].indices) if n in eval_loaders else 0 for n in ("val", "test")),
        sum(x.size for x in jax.tree.leaves(parallel.get(state.params))),
        total_steps,
        config.num_epochs,
        train_loader.num_batches(0),
        parallel.num_devices,
        jax.process_count(),
        train_loader.budget,
    )

    std, results = dataset.target_std, {}
    writer = files.MetricsWriter(workdir, enabled=is_main)
    window = MetricsWindow(fetch=parallel.get)

    def save(next_position: Position) -> None:
        checkpointer.save(
            step, state, {"epoch": next_position.epoch, "batch": next_position.batch, "seed": config.seed}
        )

    def validate(**extra) -> None:
        if "val" in eval_loaders:
            results["val_mae"] = evaluate(parallel, state.eval_params, eval_loaders["val"], std)
            writer.write(step, val_mae=results["val_mae"], **extra)

    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress_bar and is_main), dynamic_ncols=True)
    next_position = start
    shapes = ShapeWatch("the train step")
    try:
        with StopSignals() as signals:
            for position, batch, last_in_epoch in training_batches(
                train_loader, start, config.num_epochs, parallel.put_batch
            ):
                shapes.check(batch)
                state, metrics = parallel.train_step(state, batch)
                step += 1
                next_position = canonical(Position(position.epoch, position.batch + 1), train_loader.num_batches)
                window.add(metrics)
                bar.update(1)
                for hook in hooks:
                    hook(step, state, position)
                m = (
                    window.flush(keep_newest=not last_in_epoch)
                    if (step % config.log_every_steps == 0 or last_in_epoch)
                    else None
                )
                if m is not None:
                    bar.set_postfix(
                        loss=f"{m['loss']:.4f}",
                        mae=f"{m['loss'] * std:.4g} {dataset.unit}",
                        mol_s=f"{m['molecules_per_s']:.1f}",
                        epoch=position.epoch + 1,
                    )
                    writer.write(
                        step,
                        train_loss=m["loss"],
                        train_mae=m["loss"] * std,
                        molecules_per_s=m["molecules_per_s"],
                        epoch=position.epoch,
                    )
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    validate()
                if last_in_epoch and (position.epoch + 1) % config.eval_every_epochs == 0:
                    validate(epoch=position.epoch + 1)
                    if is_main and "val_mae" in results:
                        tqdm.write(
                            f"epoch {position.epoch + 1}: validation MAE {results['val_mae']:.5g} {dataset.unit}"
                        )
                stop = bool(config.max_steps) and step >= config.max_steps
                if step % config.checkpoint_every_steps == 0 or last_in_epoch or stop:
                    save(next_position)
                if stop:
                    logging.info("stopping at max_steps=%d", config.max_steps)
                    return {"step": step, **results}
                if signals.requested:  # Ctrl-C or SIGTERM: save where we stand, then stop
                    save(next_position)
                    logging.warning("interrupted: checkpoint saved at step %d", step)
                    raise KeyboardInterrupt
            if "test" in eval_loaders:
                results["test_mae"] = evaluate(parallel, state.eval_params, eval_loaders["test"], std)
                writer.write(step, test_mae=results["test_mae"])
                if is_main:
                    tqdm.write(f"test MAE {results['test_mae']:.5g} {dataset.unit}")
            return {"step": step, **results}
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
