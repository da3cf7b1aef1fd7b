"""Padded training batches, packed to a fixed budget and assembled in a background thread.

An epoch is the (per-epoch shuffled) molecules packed greedily in order into batches of at most
``batch_size`` graphs that never exceed the :class:`~se3jax.graphs.PaddingBudget` (a batch is
closed early when the next molecule would overflow it), so every batch has the same shapes,
the step compiles once, and every molecule appears exactly once per epoch. The packing is a
pure function of ``(seed, epoch)``, so a restarted run resumes at the exact batch it stopped at
with ``epoch_batches(epoch, start_batch=k)``.

>>> from se3jax.graphs import PaddingBudget
>>> budget = PaddingBudget(n_node=8, n_edge=8, n_graph=3)
>>> [b.tolist() for b in pack_batches([3, 3, 3, 5], [2, 2, 2, 8], [0, 1, 2, 3], 2, budget)]
[[0, 1], [2], [3]]
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import jraph
import numpy as np

from se3jax.basis import harmonics_dim, safe_directions, stacked_harmonics
from se3jax.graphs import PaddingBudget, check_values, pad_to_budget


def budget_for(dataset, indices, batch_size: int, slack: float = 1.1) -> PaddingBudget:
    """A budget for ``batch_size`` molecules of ``indices`` (from their mean and max sizes)."""
    return PaddingBudget.for_batch(batch_size, **dataset.stats(indices), slack=slack)


def precompute_edge_harmonics(dataset, max_degree: int, chunk: int = 1 << 18) -> np.ndarray:
    """Basis precomputation: the stacked spherical harmonics of every edge direction of
    ``dataset`` (a :class:`~se3jax.data.qm9.QM9Dataset`), ``[total_edges, (2 max_degree + 1)^2]``
    float32, to keep in host RAM as ``dataset.edge_harmonics`` (``batch_graphs`` then adds them
    as ``edges["harmonics"]``). Compact: 49 numbers per edge for degrees 0..3 (the model builds
    the 1,092 basis entries per edge from them on the fly), 0.96 GB for all of QM9."""
    shift = np.repeat(dataset.atom_offsets[:-1], dataset.num_edges)
    rel = (
        dataset.positions[dataset.receivers.astype(np.int64) + shift]
        - dataset.positions[dataset.senders.astype(np.int64) + shift]
    ).astype(np.float32)
    fn = jax.jit(lambda v: stacked_harmonics(safe_directions(v)[0], 2 * max_degree))
    out = np.empty((len(rel), harmonics_dim(2 * max_degree)), np.float32)
    for a in range(0, len(rel), chunk):
        part = rel[a : a + chunk]
        padded = np.pad(part, ((0, chunk - len(part)), (0, 0)))  # one compiled shape
        out[a : a + len(part)] = np.asarray(fn(padded))[: len(part)]
    return out


def pack_batches(
    num_nodes: Sequence[int], num_edges: Sequence[int], order: Sequence[int], batch_size: int, budget: PaddingBudget
) -> list[np.ndarray]:
    """Split ``order`` (molecule indices) into consecutive batches of at most ``batch_size``
    molecules that each fit ``budget``; a batch closes early when the next would not fit."""
    order = np.asarray(order, np.int64)
    nodes = np.asarray(num_nodes)[order].tolist()
    edges = np.asarray(num_edges)[order].tolist()
    max_graphs = min(batch_size, budget.n_graph - 1)
    bounds, batch_nodes, batch_edges, count = [0], 0, 0, 0
    for k, (n, e) in enumerate(zip(nodes, edges)):
        if not budget.fits(n, e, 1):
            raise ValueError(
                f"molecule {order[k]} ({n} nodes, {e} edges) does not fit the padding budget {budget} on its own"
            )
        if count and (count == max_graphs or not budget.fits(batch_nodes + n, batch_edges + e, count + 1)):
            bounds.append(k)
            batch_nodes, batch_edges, count = 0, 0, 0
        batch_nodes, batch_edges, count = batch_nodes + n, batch_edges + e, count + 1
    if count:
        bounds.append(len(order))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _stack(batches: list[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    """Per-device batches -> one GraphsTuple with a leading device axis ``[D, ...]``."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


class BatchLoader:
    """Padded batches of ``dataset`` molecules ``indices``, epoch by epoch.

    ``dataset`` needs ``num_nodes``/``num_edges`` (per molecule) and ``batch_graphs(indices)``
    (as :class:`~se3jax.data.qm9.QM9Dataset`). Batches are GraphsTuples of numpy arrays
    (float32/int32) with ``globals={"target": [G] float32}`` (normalised; 0 for padding).
    With ``num_devices > 1`` each item stacks one padded batch per device: ``[D, ...]``; the last
    group of an epoch is completed with all-padding batches.

    Across hosts (``process_count > 1``) every process packs the same epoch (it depends only on
    seed and epoch) and takes every ``process_count``-th device group, the batch list padded so
    that all processes run the same number of steps (collectives never wait on a missing one).
    """

    def __init__(
        self,
        dataset,
        indices,
        batch_size: int,
        budget: PaddingBudget,
        shuffle: bool = True,
        seed: int = 0,
        num_devices: int = 1,
        prefetch: int = 4,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size < 1 or num_devices < 1 or prefetch < 1:
            raise ValueError(
                f"batch_size ({batch_size}), num_devices ({num_devices}) and prefetch ({prefetch}) must be positive"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        self.process_index, self.process_count = process_index, process_count
        self.indices = np.asarray(indices, np.int64).reshape(-1)
        if self.indices.size == 0:
            raise ValueError("BatchLoader got no molecule indices")
        self.dataset, self.batch_size, self.budget = dataset, batch_size, budget
        self.shuffle, self.seed, self.num_devices, self.prefetch = shuffle, seed, num_devices, prefetch
        self._plans: dict[int, list[list[np.ndarray]]] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The molecules of ``epoch`` in visiting order: a permutation seeded by (seed, epoch)."""
        if not self.shuffle:
            return self.indices
        return np.random.default_rng([self.seed, epoch]).permutation(self.indices)

    def plan(self, epoch: int) -> list[list[np.ndarray]]:
        """The epoch's steps: each a list of ``num_devices`` index arrays (empty = padding)."""
        if epoch not in self._plans:
            batches = pack_batches(
                self.dataset.num_nodes, self.dataset.num_edges, self.order(epoch), self.batch_size, self.budget
            )
            d = self.num_devices
            batches += [np.zeros(0, np.int64)] * (-len(batches) % (d * self.process_count))
            groups = [batches[k : k + d] for k in range(0, len(batches), d)]
            self._plans = {epoch: groups[self.process_index :: self.process_count]}
        return self._plans[epoch]

    def num_batches(self, epoch: int) -> int:
        """How many items ``epoch_batches(epoch)`` yields (device groups if ``num_devices > 1``)."""
        return len(self.plan(epoch))

    def assemble(self, step: list[np.ndarray]) -> jraph.GraphsTuple:
        """One step's padded batch (stacked over devices when ``num_devices > 1``), its values
        checked on the host (a compiled step cannot check them)."""
        batches = [pad_to_budget(self.dataset.batch_graphs(idx), self.budget) for idx in step]
        for batch in batches:
            check_values(batch)
        return batches[0] if self.num_devices == 1 else _stack(batches)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[jraph.GraphsTuple]:
        """The padded batches of ``epoch`` from ``start_batch`` on, assembled ahead in a
        background thread (a bounded queue of ``prefetch`` batches)."""
        steps = self.plan(epoch)
        if not 0 <= start_batch <= len(steps):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(steps)}] for epoch {epoch}")
        return BackgroundIterator((self.assemble(step) for step in steps[start_batch:]), self.prefetch)


_ITEM, _END, _ERROR = range(3)


class BackgroundIterator:
    """Runs an iterator in a daemon thread, ``size`` items ahead. Exceptions in the thread are
    re-raised to the consumer; ``close()`` (or abandoning the iterator) stops the thread."""

    def __init__(self, items: Iterator, size: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        # the thread gets only the queue and the event, not ``self``: abandoning the iterator
        # lets it be garbage-collected, and __del__ stops the thread
        self._thread = threading.Thread(
            target=_produce, args=(items, self._queue, self._stop), daemon=True, name="se3jax-batch-loader"
        )
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self, timeout: float = 2.0) -> None:
        """Stop the producer thread and wait (up to ``timeout`` s) for it to end."""
        self._done = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self._done = True
        self._stop.set()


def _produce(items: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    def put(message) -> bool:
        while not stop.is_set():
            try:
                out.put(message, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in items:
            if stop.is_set() or not put((_ITEM, item)):
                return
        put((_END, None))
    except BaseException as error:  # handed to the consumer, which re-raises it
        put((_ERROR, error))
