"""Data parallelism with pmap semantics: one padded batch per device, gradients averaged with
``lax.psum`` over the named axis ``"devices"``. Two interchangeable implementations:

- ``pmap``: ``jax.pmap`` over the local devices (what DGX users ask for);
- ``shard_map``: ``jax.jit(jax.shard_map(...))`` over a 1-D mesh, the modern equivalent
  (since JAX 0.10, pmap itself compiles to this).

Both take a state replicated on every device and a batch stacked over devices ``[D, ...]``,
and give the same numbers. Across hosts (after ``jax.distributed.initialize``) each process
feeds its local devices' batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from se3jax.training.steps import make_eval_step, make_train_step

AXIS = "devices"


def _first_device_block(x):
    return x[0]


class DataParallel:
    """Wraps the train and eval steps for ``devices`` with ``method`` (pmap | shard_map)."""

    def __init__(self, model, optimizer, method: str = "pmap", devices=None):
        if method not in ("pmap", "shard_map"):
            raise ValueError(f"unknown parallel method {method!r}; choose 'pmap' or 'shard_map'")
        self.method = method
        self.local_devices = list(devices) if devices is not None else jax.local_devices()
        self.num_local = len(self.local_devices)
        global_devices = self.local_devices if jax.process_count() == 1 else jax.devices()
        self.mesh = Mesh(np.array(global_devices), (AXIS,))
        train = make_train_step(model, optimizer, axis_name=AXIS)
        evaluate = make_eval_step(model, axis_name=AXIS)
        if method == "pmap":
            self.train_step = jax.pmap(train, axis_name=AXIS, devices=self.local_devices,
                                       donate_argnums=0)
            self.eval_step = jax.pmap(evaluate, axis_name=AXIS, devices=self.local_devices)
        else:
            # check_vma=False: gradients of the replicated state stay per-device (as under pmap)
            # and the step's explicit psum averages them. With the check on, autodiff would
            # already sum them across devices and the psum would count them twice.
            per_device = lambda fn: (lambda a, batch: fn(a, jax.tree.map(_first_device_block, batch)))
            self.train_step = jax.jit(jax.shard_map(
                per_device(train), mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                check_vma=False), donate_argnums=0)
            self.eval_step = jax.jit(jax.shard_map(
                per_device(evaluate), mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                check_vma=False))

    def put_replicated(self, tree):
        """Pytree -> the same value on every device (pmap: with a leading device axis). Always
        a fresh copy: the train step donates it, which must not delete the caller's arrays."""
        tree = jax.device_get(tree)
        if self.method == "pmap":
            stacked = jax.tree.map(lambda x: np.broadcast_to(x, (self.num_local,) + np.shape(x)), tree)
            sharding = NamedSharding(self.mesh, P(AXIS))
            return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def put_batch(self, batch):
        """This process's batch, as the loader yields it (one plain batch for a single device,
        stacked ``[D_local, ...]`` for several) -> arrays sharded along the device axis
        (across hosts, each process gives its own devices' part)."""
        if self.num_local == 1:
            batch = jax.tree.map(lambda x: np.asarray(x)[None], batch)
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                            batch)

    def get(self, tree):
        """One host copy of a replicated pytree (state or metrics)."""
        if self.method == "pmap":
            return jax.device_get(jax.tree.map(_first_device_block, tree))
        return jax.device_get(tree)
