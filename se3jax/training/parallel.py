"""Data parallelism, one code path for one device, several local devices and several hosts:
``jax.jit(jax.shard_map(step))`` over a 1-D mesh of devices (axis ``"devices"``).

Every device gets one padded batch of ``batch_size`` molecules (pmap semantics: ``batch_size``
is per device; the global batch is ``batch_size x devices``); the step divides by the real
molecules of all devices and sums gradients with ``lax.psum``, so the update is that of the
mean loss over the global batch. The mesh lists each process's devices in process order; each
process feeds its own devices' batches (``jax.make_array_from_process_local_data``).

``jax.pmap`` is not used: since JAX 0.8 it is itself ``jit(shard_map)`` over the same kind of
mesh, so a second path would compute the same numbers and double what must be tested.

Multi-host runs start JAX's distributed runtime first (:func:`initialize_distributed`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from se3jax.training.steps import make_eval_step, make_train_step
from se3jax.training.workdir import config_changes

AXIS = "devices"


def _first_device_block(x):
    return x[0]


def mesh_devices(num_local: int = 0) -> list:
    """The mesh's devices: the first ``num_local`` (0 = all) devices of every process, process
    by process. Every process must use the same count."""
    by_process = collections.defaultdict(list)
    for device in jax.devices():
        by_process[device.process_index].append(device)
    devices = []
    for process in sorted(by_process):
        local = sorted(by_process[process], key=lambda d: d.id)
        if num_local > len(local):
            raise ValueError(f"num_devices={num_local} but process {process} has {len(local)} devices")
        devices += local[: num_local or None]
    return devices


class DataParallel:
    """The train and eval steps over a mesh of ``num_local_devices`` per process (0 = all)."""

    def __init__(self, model, num_local_devices: int = 0):
        devices = mesh_devices(num_local_devices)
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
        self.num_local = len(self.local_devices)
        self.num_devices = len(devices)
        # check_vma=False: gradients of the replicated state stay per-device and the step's
        # explicit psum sums them (with the check on, autodiff would already sum them across
        # devices and the psum would count them twice).
        per_device = lambda fn: lambda a, batch: fn(a, jax.tree.map(_first_device_block, batch))
        train = make_train_step(model, axis_name=AXIS)  # the optimizer travels in the state
        evaluate = make_eval_step(model, axis_name=AXIS)
        self.train_step = jax.jit(
            jax.shard_map(
                per_device(train), mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
            ),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            jax.shard_map(per_device(evaluate), mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False)
        )

    def put_replicated(self, tree):
        """Pytree -> the same value on every device of the mesh (each process gives the whole
        value). Always a fresh copy: the train step donates it."""
        sharding = NamedSharding(self.mesh, P())

        def replicate(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(replicate, jax.device_get(tree))

    def put_batch(self, batch):
        """This process's batch, as the loader yields it (one plain batch for a single local
        device, stacked ``[D_local, ...]`` for several) -> one global array sharded along the
        device axis."""
        if self.num_local == 1:
            batch = jax.tree.map(lambda x: np.asarray(x)[None], batch)
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

    def get(self, tree):
        """One host copy of a replicated pytree (state or metrics), on every process."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def prefetch_to_device(batches: Iterable, put: Callable, size: int = 2) -> Iterator:
    """Yield ``put(batch)`` for each host batch with ``size`` more already sent ahead: the
    transfers are asynchronous, so the device never waits for the next batch's copy.

    >>> list(prefetch_to_device(iter([1, 2, 3]), lambda b: b * 10))
    [10, 20, 30]
    """
    ahead = collections.deque()
    for batch in batches:
        ahead.append(put(batch))
        if len(ahead) > size:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


# ---------------------------------------------------------------------------------------------
# Several hosts


def initialize_distributed(config) -> None:
    """Start JAX's distributed runtime for a multi-host run (``config.distributed``).

    Without explicit fields JAX detects the cluster (SLURM, Open MPI, ...); the fields
    ``coordinator_address``, ``num_processes`` and ``process_id`` override it. A process that
    dies stops the others within ``heartbeat_timeout_s`` with an error naming it. CPU devices
    use gloo collectives.
    """
    if not config.distributed or jax.distributed.is_initialized():
        return
    if config.num_processes or config.process_id >= 0 or config.coordinator_address:
        if not (config.coordinator_address and config.num_processes and config.process_id >= 0):
            raise ValueError(
                "explicit distributed settings need coordinator_address, num_processes and process_id together"
            )
    kwargs = dict(heartbeat_timeout_seconds=config.heartbeat_timeout_s)
    if config.coordinator_address:
        kwargs.update(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def code_version() -> str:
    """A hash of the se3jax source files (what every process of a run must share)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_AGREEMENT_BYTES = 1 << 16
PER_PROCESS_KEYS = ("process_id", "cache_dir")  # may differ between the processes of one run


def check_processes_agree(config_dict: dict) -> None:
    """Refuse to start processes with different configs or code: every process sees every
    other's config and code version and raises naming the keys that differ from process 0."""
    if jax.process_count() == 1:
        return
    shared = {k: v for k, v in config_dict.items() if k not in PER_PROCESS_KEYS}
    mine = json.dumps({"config": shared, "code_version": code_version()}, sort_keys=True).encode()
    if len(mine) > _AGREEMENT_BYTES:
        raise ValueError("config too large to compare across processes")
    buffer = np.zeros(_AGREEMENT_BYTES, np.uint8)
    buffer[: len(mine)] = np.frombuffer(mine, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, _AGREEMENT_BYTES)
    runs = [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]
    problems = []
    for process, other in enumerate(runs[1:], start=1):
        keys = [
            f"{k} ({runs[0]['config'].get(k)!r} vs {other['config'].get(k)!r})"
            for k in config_changes(runs[0]["config"], other["config"])
        ]
        if other["code_version"] != runs[0]["code_version"]:
            keys.append(f"code version ({runs[0]['code_version']} vs {other['code_version']})")
        if keys:
            problems.append(f"process {process} differs from process 0 in {', '.join(keys)}")
    if problems:
        raise ValueError("; ".join(problems) + "; start every process with the same config and code")
