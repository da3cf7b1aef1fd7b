"""The training configuration: one schema with the reference defaults, and its validation.

Every config file in ``configs/`` starts from :func:`default_config`; :func:`validate_config`
rejects unknown keys (with the closest valid name) and bad values before any work starts.

The model and execution keys are not spelled here: they are the fields of
:class:`~se3jax.model.SE3TransformerPooled` named in :data:`MODEL_KEYS` and every field of
:class:`~se3jax.execution.Execution` (its documentation is their help, :func:`config_help`),
with the defaults those classes give them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from pathlib import Path

import ml_collections

from se3jax.data.qm9 import TARGET_POOLING, TARGETS
from se3jax.execution import Execution
from se3jax.model import SE3TransformerPooled
from se3jax.precision import TRAINING_POLICIES

# SE3TransformerPooled's settings a config chooses (the feature sizes come from the data).
MODEL_KEYS = ("num_layers", "num_degrees", "num_channels", "num_heads", "channels_div", "pooling", "self_interaction")
# Execution's fields a config chooses (``mode`` is set by the code: training or inference).
EXECUTION_FIELDS = tuple(f for f in dataclasses.fields(Execution) if f.metadata["config"])


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # data
    c.task = "homo"  # one of se3jax.data.TARGETS
    c.cache_dir = ""  # "" = ~/.cache/se3jax (processed QM9 lives there)
    c.max_molecules = 0  # >0: process only the first K molecules (tests, smoke runs)
    c.max_train_molecules = 0  # >0: train on the first K molecules of the train split
    c.max_eval_molecules = 0  # >0: evaluate on the first K molecules of val and test
    c.precompute_bases = False  # keep per-edge spherical harmonics in host RAM (49 floats/edge)
    # model (docs/design.md, section 1): SE3TransformerPooled's defaults
    model_fields = {f.name: f for f in dataclasses.fields(SE3TransformerPooled)}
    for key in MODEL_KEYS:
        c[key] = model_fields[key].default
    c.pooling = "auto"  # per target (se3jax.data.qm9.TARGET_POOLING) | max | mean | sum | softmax
    # execution (speed and memory only, never the parameters): every Execution field
    for field in EXECUTION_FIELDS:
        c[field.name] = field.default
    # optimisation (docs/design.md, section 4)
    c.batch_size = 240  # molecules per device and step
    c.num_epochs = 100
    c.learning_rate = 0.002
    c.final_learning_rate_factor = 0.1  # cosine decay to lr * factor
    c.warmup_epochs = 0.0  # linear warm-up before the cosine (0: none, as the reference)
    c.ema_decay = 0.0  # >0: evaluate a moving average of the weights (e.g. 0.999)
    c.weight_decay = 0.1
    c.max_steps = 0  # >0: stop after this many steps in total (resumable)
    c.seed = 0
    # parallelism (se3jax.training.parallel): batch_size molecules per device and step
    c.num_devices = 0  # devices per process; 0 = all local devices
    c.distributed = False  # multi-host: start jax.distributed (cluster auto-detected)
    c.coordinator_address = ""  # explicit multi-host settings (override auto-detection):
    c.num_processes = 0  #   "host:port" of process 0, the process count,
    c.process_id = -1  #   and this process's index
    c.heartbeat_timeout_s = 60  # a dead process stops the others within this time
    # bookkeeping
    c.eval_every_epochs = 1
    c.eval_every_steps = 0  # >0: also evaluate every N steps
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.log_every_steps = 10  # metrics reach the host at least this often (<= 10)
    c.progress_bar = True
    c.compilation_cache = True  # keep compiled steps in <cache_dir>/compiled: a rerun loads them
    return c


_CHOICES = {
    "pooling": ("auto", "max", "mean", "sum", "softmax"),
    "self_interaction": ("per_edge", "per_node"),
    **{f.name: f.metadata["choices"] for f in EXECUTION_FIELDS if f.metadata["choices"] is not None},
    "precision": TRAINING_POLICIES,  # fp64 is for tests, not training
}
_POSITIVE = (
    "num_layers",
    "num_degrees",
    "num_channels",
    "num_heads",
    "channels_div",
    "batch_size",
    "num_epochs",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_epochs",
    "heartbeat_timeout_s",
)
_NON_NEGATIVE = (
    "max_molecules",
    "max_train_molecules",
    "max_eval_molecules",
    "max_steps",
    "num_devices",
    "eval_every_steps",
    "num_processes",
)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming the first problem: unknown key, bad choice or range."""
    known = default_config()
    for key in config.keys():
        if key not in known:
            close = difflib.get_close_matches(key, list(known.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
    if config.task not in TARGETS:
        raise ValueError(f"unknown task {config.task!r}; valid tasks: {', '.join(TARGETS)}")
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise ValueError(f"config.{key}={config[key]!r} is not one of {choices}")
    for key in _POSITIVE:
        if not config[key] > 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]!r}")
    for key in _NON_NEGATIVE:
        if config[key] < 0:
            raise ValueError(f"config.{key} must be >= 0, got {config[key]!r}")
    if config.log_every_steps > 10:
        # JAX 0.10 CPU collectives abort when ~50 unsynchronised steps are queued.
        raise ValueError("config.log_every_steps must be <= 10 (metrics must reach the host often)")
    if config.num_channels % config.channels_div or (config.num_channels // config.channels_div) % config.num_heads:
        raise ValueError(
            f"num_channels / channels_div ({config.num_channels}/{config.channels_div}) "
            f"must be divisible by num_heads ({config.num_heads})"
        )
    if not 0 <= config.warmup_epochs < config.num_epochs or not 0 <= config.ema_decay < 1:
        raise ValueError("need 0 <= warmup_epochs < num_epochs and 0 <= ema_decay < 1")
    if not 0 < config.final_learning_rate_factor <= 1 or config.learning_rate <= 0:
        raise ValueError("need learning_rate > 0 and 0 < final_learning_rate_factor <= 1")
    execution_from_config(config)  # Execution's own checks (e.g. edge_chunk >= 0)


def load_config_file(path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as ``configs/qm9.py`` (outside absl flags)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"se3jax_config_{path.stem}", path)
    if spec is None or not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def execution_from_config(config: ml_collections.ConfigDict, mode: str = "train") -> Execution:
    """The model's :class:`~se3jax.execution.Execution` from a config's execution fields."""
    # configs saved before a field existed take its default
    return Execution(**{f.name: config.get(f.name, f.default) for f in EXECUTION_FIELDS}, mode=mode)


def resolve_pooling(config: ml_collections.ConfigDict) -> str:
    """``auto`` -> the task's pooling (sum for extensive targets, max for the others)."""
    pooling = config.get("pooling", "max")
    return TARGET_POOLING[config.task] if pooling == "auto" else pooling


def model_kwargs(config: ml_collections.ConfigDict, mode: str = "train") -> dict:
    """Keyword arguments of SE3TransformerPooled from a config (shared by training and
    inference, so a saved config rebuilds exactly the trained model)."""
    defaults = default_config()  # configs saved before a key existed take its default
    kwargs = {key: config.get(key, defaults[key]) for key in MODEL_KEYS}
    return {**kwargs, "pooling": resolve_pooling(config), "execution": execution_from_config(config, mode)}


def config_help() -> str:
    """The execution keys with their defaults and meaning, from :class:`Execution`'s fields (the
    training script's ``--help``)."""
    lines = [f"  --config.{f.name}={f.default!r}: {f.metadata['doc']}" for f in EXECUTION_FIELDS]
    return "Execution options (speed and memory only, never the parameters):\n" + "\n".join(lines) + "\n"
