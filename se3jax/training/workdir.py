"""What a training run keeps in its workdir, and the rules for resuming there.

Layout::

    config.json          the resolved config of the run
    normalisation.json   task, unit, train-split mean/std (what inference needs)
    training_domain.json sizes, elements and bond patterns of the training molecules (inference
                         warns about molecules outside them)
    metrics.jsonl        one JSON object per logged step / evaluation, each step once
    tensorboard/         TensorBoard event files
    checkpoints/<step>/  orbax checkpoints (state + data position)

Training writes these and inference reads them; both take the names from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

CONFIG_FILE = "config.json"
NORMALISATION_FILE = "normalisation.json"
DOMAIN_FILE = "training_domain.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"

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
    changed = [k for k in config_changes(read_json(saved_file), config) if k not in RESUMABLE_KEYS]
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


class MetricsWriter:
    """JSON lines in the workdir plus TensorBoard scalars (written by one process only)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self._file = open(workdir / METRICS_FILE, "a")
            self._tb = SummaryWriter(str(workdir / TENSORBOARD_DIR))

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
