"""What a training run keeps in its workdir, and the rules for resuming there.

Layout::

    config.json          the resolved config of the run
    normalisation.json   task, unit, train-split mean/std (what inference needs)
    training_domain.json sizes, elements and bond patterns of the training molecules (inference
                         warns about molecules outside them)
    metrics.jsonl        one JSON object per logged step / evaluation, each step once
    tensorboard/         TensorBoard event files
    checkpoints/<step>/  orbax checkpoints (state + data position)
    results.json         written when the run finished: its step, validation and test MAE

Training writes these and inference reads them; both take the names from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tensorboardX import SummaryWriter

CONFIG_FILE = "config.json"
NORMALISATION_FILE = "normalisation.json"
DOMAIN_FILE = "training_domain.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
RESULTS_FILE = "results.json"
# Config keys that change what a rerun of a finished run would train or evaluate.
_FINISHED_KEYS = ("num_epochs", "max_eval_molecules")

# Config keys a rerun may change and still resume: they change neither the model, nor the
# optimiser state's structure, nor which batches come next. (num_epochs lengthens or shortens
# the learning-rate schedule from the step reached.) Execution options change speed only.
RESUMABLE_KEYS = frozenset(
    {
        "num_epochs",
        "max_steps",
        "log_every_steps",
        "eval_every_epochs",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "progress_bar",
        "compilation_cache",
        "cache_dir",
        "max_eval_molecules",
        "fuse_level",
        "edge_chunk",
        "radial_memory_mb",
        "remat",
        "low_memory",
        "kernel",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
        "heartbeat_timeout_s",
    }
)


def save_json(path: Path, data: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def config_changes(saved: dict, config: dict) -> list[str]:
    """The keys whose values differ between a saved config and a new one (sorted)."""
    keys = set(saved) | set(config)
    return sorted(k for k in keys if saved.get(k, None) != config.get(k, None))


def check_resumable(workdir: Path, config: dict) -> None:
    """Refuse to resume a run in ``workdir`` under a config that would make its saved position
    or state mean something else; name the keys. A workdir without a checkpoint may take any
    config (the saved one is simply replaced)."""
    saved_file = workdir / CONFIG_FILE
    if not saved_file.exists() or not any((workdir / CHECKPOINT_DIR).glob("[0-9]*")):
        return
    # keys only the saved config has are retired options (e.g. ``parallel``): nothing to compare
    changed = [k for k in config_changes(read_json(saved_file), config) if k not in RESUMABLE_KEYS and k in config]
    if changed:
        saved = read_json(saved_file)
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(
            f"{workdir} holds a run with another config ({detail}); resuming it would "
            f"not continue the same training. Use a new workdir, or restore those values. "
            f"Keys that may change on resume: {', '.join(sorted(RESUMABLE_KEYS))}"
        )


def drop_metrics_after(workdir: Path, step: int) -> int:
    """Remove metrics rows logged after ``step`` (a resumed run logs those steps again, so
    every reader sees each step once). Returns how many rows were dropped."""
    path = workdir / METRICS_FILE
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def newest_checkpoint_step(workdir: Path) -> int | None:
    """The step of the newest complete checkpoint (orbax renames a checkpoint's folder to its
    step once written), or None."""
    steps = [int(p.name) for p in (workdir / CHECKPOINT_DIR).glob("[0-9]*") if p.name.isdigit()]
    return max(steps, default=None)


def save_results(workdir: Path, results: dict, config: dict) -> None:
    """Mark the run finished: its results (``step``, ``val_mae``, ``test_mae``) and the config
    values they were obtained under."""
    save_json(workdir / RESULTS_FILE, {"results": results, "config": {k: config[k] for k in _FINISHED_KEYS}})


def finished_results(workdir: Path, config: dict) -> dict | None:
    """The stored results if ``workdir`` holds a finished run that ``config`` would neither train
    further nor evaluate differently: the results name the newest checkpoint's step, the epochs
    asked for are no more than those trained, the evaluation subset is the same. Else None."""
    path = workdir / RESULTS_FILE
    if not path.exists():
        return None
    stored = read_json(path)
    if stored["results"]["step"] != newest_checkpoint_step(workdir):
        return None  # trained further since (e.g. more epochs), or checkpoints removed
    if config["num_epochs"] > stored["config"]["num_epochs"]:
        return None
    if config["max_eval_molecules"] != stored["config"]["max_eval_molecules"]:
        return None
    return stored["results"]


class MetricsWriter:
    """JSON lines in the workdir plus TensorBoard scalars (written by one process only). The
    files are opened at the first write, so a resumed run may first drop the rows after its
    checkpoint (:func:`drop_metrics_after`)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.workdir, self.enabled = workdir, enabled
        self._file = self._tb = None

    def write(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.workdir / METRICS_FILE, "a")
            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR))
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
