"""``train_and_evaluate(config, workdir)``: QM9 training with evaluation, checkpoints that
resume exactly, metrics as JSON lines and TensorBoard events, all outputs in ``workdir``.

Workdir layout::

    config.json          the resolved config of the run
    normalisation.json   task, unit, train-split mean/std (what inference needs)
    metrics.jsonl        one JSON object per logged step / evaluation
    tensorboard/         TensorBoard event files
    checkpoints/<step>/  orbax checkpoints (state + data position)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from se3jax.data.loader import BatchLoader, budget_for
from se3jax.data.qm9 import DEFAULT_CACHE_DIR, load_qm9
from se3jax.graphs import pad_to_budget
from se3jax.model import SE3TransformerPooled
from se3jax.training.checkpoints import Checkpointer
from se3jax.training.config import model_kwargs, validate_config
from se3jax.training.parallel import DataParallel
from se3jax.training.steps import create_train_state

CONFIG_FILE, NORMALISATION_FILE, METRICS_FILE = "config.json", "normalisation.json", "metrics.jsonl"


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay; cosine decay from lr to lr * factor, no warm-up."""
    schedule = optax.cosine_decay_schedule(config.learning_rate,
                                           decay_steps=max(config.num_epochs * steps_per_epoch, 1),
                                           alpha=config.final_learning_rate_factor)
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def build_model(config) -> SE3TransformerPooled:
    return SE3TransformerPooled(**model_kwargs(config))


class MetricsWriter:
    """JSON lines in the workdir plus TensorBoard scalars (written by process 0 only)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter
            self._file = open(workdir / METRICS_FILE, "a")
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def evaluate(parallel: DataParallel, params, loader: BatchLoader, std: float) -> float:
    """MAE over the loader's molecules, in the target's unit (exact: sums of errors and counts)."""
    total, count = 0.0, 0.0
    with contextlib.closing(loader.epoch_batches(0)) as batches:
        for batch in batches:
            out = parallel.get(parallel.eval_step(params, parallel.put_batch(batch)))
            total += float(out["abs_error_sum"])
            count += float(out["num_graphs"])
    return total / max(count, 1.0) * std


def _save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train on the QM9 train split, evaluate on validation during training and on test at
    the end. Restarting with the same ``workdir`` resumes from the last checkpoint at the exact
    batch it stopped at. Returns the final metrics (MAE in the target's unit)."""
    validate_config(config)
    if config.distributed:
        jax.distributed.initialize()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        _save_json(workdir / CONFIG_FILE, config.to_dict())

    dataset = load_qm9(config.cache_dir or DEFAULT_CACHE_DIR, config.task, config.max_molecules or None)
    if config.precompute_bases:
        seconds = dataset.precompute_harmonics(config.num_degrees - 1)
        logging.info("precomputed edge harmonics in %.1f s (%.0f MB in host RAM)", seconds,
                     dataset.edge_harmonics.nbytes / 1e6)
    if is_main:
        _save_json(workdir / NORMALISATION_FILE, {"task": dataset.task, "unit": dataset.unit,
                                                  "mean": dataset.target_mean, "std": dataset.target_std})
    limit = lambda idx, k: idx[:k] if k else idx
    train_idx = limit(dataset.splits["train"], config.max_train_molecules)
    val_idx = limit(dataset.splits["val"], config.max_eval_molecules)
    test_idx = limit(dataset.splits["test"], config.max_eval_molecules)

    devices = jax.local_devices()[:config.num_devices or None]
    num_devices = len(devices)
    budget = budget_for(dataset, np.concatenate([train_idx, val_idx, test_idx]), config.batch_size)
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_loader = BatchLoader(dataset, train_idx, config.batch_size, budget, shuffle=True,
                               seed=config.seed, num_devices=num_devices, **hosts)
    eval_loaders = {name: BatchLoader(dataset, idx, config.batch_size, budget, shuffle=False,
                                      num_devices=num_devices, **hosts)
                    for name, idx in (("val", val_idx), ("test", test_idx)) if len(idx)}
    steps_per_epoch = train_loader.num_batches(0)
    logging.info("QM9 %s: %d train / %d val / %d test molecules, %d steps per epoch on %d device(s), "
                 "padding budget %s", dataset.task, len(train_idx), len(val_idx), len(test_idx),
                 steps_per_epoch, num_devices, budget)

    model = build_model(config)
    optimizer = make_optimizer(config, steps_per_epoch)
    first = pad_to_budget(dataset.batch_graphs(train_loader.plan(0)[0][0]), budget)  # for shapes
    state = create_train_state(model, optimizer, first, jax.random.PRNGKey(config.seed),
                               loss_scaling=config.precision == "fp16")
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    epoch, start_batch = 0, 0
    restored = checkpointer.restore(state)
    if restored is not None:
        state, meta = restored
        epoch, start_batch = meta["epoch"], meta["batch"]
        logging.info("resuming at step %d (epoch %d, batch %d)", int(state.step), epoch, start_batch)
    parallel = DataParallel(model, optimizer, config.parallel, devices)
    replicated = parallel.put_replicated(state)
    step = int(state.step)
    std = dataset.target_std
    writer = MetricsWriter(workdir, enabled=is_main)
    results: dict = {}

    position = (epoch, start_batch)  # where the next step's batch comes from

    def save() -> None:
        epoch_, batch_ = position
        if batch_ >= train_loader.num_batches(epoch_):  # the end of an epoch is the next one's start
            epoch_, batch_ = epoch_ + 1, 0
        checkpointer.save(step, parallel.get(replicated), {"epoch": epoch_, "batch": batch_,
                                                           "seed": config.seed})

    try:
        while epoch < config.num_epochs:
            total = train_loader.num_batches(epoch)
            bar = tqdm(total=total, initial=start_batch, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                       disable=not (config.progress_bar and is_main), dynamic_ncols=True)
            window_loss, window_graphs, window_start = 0.0, 0.0, time.perf_counter()
            pending = []
            with contextlib.closing(train_loader.epoch_batches(epoch, start_batch)) as batches:
                for batch_index, batch in enumerate(batches, start=start_batch):
                    replicated, metrics = parallel.train_step(
                        replicated, parallel.put_batch(batch))
                    step += 1
                    position = (epoch, batch_index + 1)
                    pending.append(metrics)
                    bar.update(1)
                    if step % config.log_every_steps == 0 or batch_index + 1 == total:
                        # fetching metrics also keeps the host in step with the devices
                        for m in parallel.get(pending):
                            window_loss += float(m["loss"]) * float(m["num_graphs"])
                            window_graphs += float(m["num_graphs"])
                        pending = []
                        elapsed = time.perf_counter() - window_start
                        mae = window_loss / max(window_graphs, 1.0) * std
                        rate = window_graphs / max(elapsed, 1e-9)
                        bar.set_postfix(loss=f"{window_loss / max(window_graphs, 1.0):.4f}",
                                        mae=f"{mae:.4g} {dataset.unit}", mol_s=f"{rate:.1f}")
                        writer.write(step, train_loss=window_loss / max(window_graphs, 1.0),
                                     train_mae=mae, molecules_per_s=rate, epoch=epoch)
                        window_loss, window_graphs, window_start = 0.0, 0.0, time.perf_counter()
                    if config.eval_every_steps and step % config.eval_every_steps == 0 and "val" in eval_loaders:
                        results["val_mae"] = evaluate(parallel, replicated.params, eval_loaders["val"], std)
                        writer.write(step, val_mae=results["val_mae"])
                    if step % config.checkpoint_every_steps == 0:
                        save()
                    if config.max_steps and step >= config.max_steps:
                        save()
                        bar.close()
                        logging.info("stopping at max_steps=%d", config.max_steps)
                        return {"step": step, **results}
            bar.close()
            epoch, start_batch = epoch + 1, 0
            position = (epoch, 0)
            if epoch % config.eval_every_epochs == 0 and "val" in eval_loaders:
                results["val_mae"] = evaluate(parallel, replicated.params, eval_loaders["val"], std)
                writer.write(step, val_mae=results["val_mae"], epoch=epoch)
                if is_main:
                    tqdm.write(f"epoch {epoch}: validation MAE {results['val_mae']:.5g} {dataset.unit}")
            save()
        if "test" in eval_loaders:
            results["test_mae"] = evaluate(parallel, replicated.params, eval_loaders["test"], std)
            writer.write(step, test_mae=results["test_mae"])
            if is_main:
                tqdm.write(f"test MAE {results['test_mae']:.5g} {dataset.unit}")
        return {"step": step, **results}
    except KeyboardInterrupt:
        # keep everything done so far: the next run with this workdir resumes here
        save()
        logging.warning("interrupted: checkpoint saved at step %d", step)
        raise
    finally:
        writer.close()
        checkpointer.close()
