"""The pieces of the training loop, each testable alone: where the data stands (``Position``),
the stream of training batches from a saved position, the metrics window, and a watch that
warns when a step compiles again.

>>> class Loader:  # three epochs of 2, 3 and 2 batches
...     def num_batches(self, epoch): return [2, 3, 2][epoch]
...     def epoch_batches(self, epoch, start): return iter(range(start, self.num_batches(epoch)))
>>> [(p.epoch, p.batch, b) for p, b, _ in training_batches(Loader(), Position(1, 1), num_epochs=3)]
[(1, 1, 1), (1, 2, 2), (2, 0, 0), (2, 1, 1)]
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from se3jax.training.parallel import prefetch_to_device


class Position(NamedTuple):
    """The next batch to train on: ``batch`` of ``epoch`` (what a checkpoint saves)."""

    epoch: int
    batch: int


def canonical(position: Position, num_batches: Callable[[int], int]) -> Position:
    """The end of an epoch is the next epoch's start (one spelling for checkpoints)."""
    if position.batch >= num_batches(position.epoch):
        return Position(position.epoch + 1, 0)
    return position


def training_batches(
    loader, start: Position, num_epochs: int, put: Callable = lambda batch: batch
) -> Iterator[tuple[Position, object, bool]]:
    """``(position, batch, last_in_epoch)`` from ``start`` to the end of ``num_epochs``: the
    resume logic lives here, once. ``put`` moves each batch to the devices (ahead of use, see
    :func:`se3jax.training.parallel.prefetch_to_device`)."""
    if start.epoch >= num_epochs:  # the run is complete
        return
    first_epoch, first = canonical(start, loader.num_batches)
    for epoch in range(first_epoch, num_epochs):
        total = loader.num_batches(epoch)
        batches = loader.epoch_batches(epoch, first)
        try:
            for index, batch in enumerate(prefetch_to_device(batches, put), start=first):
                yield Position(epoch, index), batch, index + 1 == total
        finally:  # stop the loader's background thread, also when the consumer stops early
            getattr(batches, "close", lambda: None)()
        first = 0


@dataclasses.dataclass
class MetricsWindow:
    """Accumulates per-step metrics (fetched from the devices lazily) and reports means and
    throughput since the last flush. The newest step may stay in flight, so the devices never
    wait for the host."""

    fetch: Callable = jax.device_get
    _pending: list = dataclasses.field(default_factory=list)
    _loss: float = 0.0
    _graphs: float = 0.0
    _start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, metrics) -> None:
        self._pending.append(metrics)

    def _collect(self, keep_newest: bool) -> None:
        ready = self._pending[:-1] if keep_newest else self._pending
        for m in self.fetch(ready):
            self._loss += float(m["loss"]) * float(m["num_graphs"])
            self._graphs += float(m["num_graphs"])
        self._pending = self._pending[len(ready) :]

    def flush(self, keep_newest: bool = False) -> dict | None:
        """``{"loss", "molecules", "molecules_per_s"}`` over the window, then start a new one
        (None if no step is complete yet). Fetching the metrics also keeps the host in step
        with the devices."""
        self._collect(keep_newest)
        if not self._graphs:
            return None
        now = time.perf_counter()
        out = {
            "loss": self._loss / max(self._graphs, 1.0),
            "molecules": self._graphs,
            "molecules_per_s": self._graphs / max(now - self._start, 1e-9),
        }
        self._loss, self._graphs, self._start = 0.0, 0.0, now
        return out


def input_signature(inputs) -> tuple:
    """What a compiled executable is specific to: the tree's structure and each leaf's shape,
    dtype and weak type. Hashable (a dictionary key for executables)."""
    leaves, tree = jax.tree.flatten(inputs)
    return tree, tuple((np.shape(x), jnp.result_type(x), getattr(x, "weak_type", False)) for x in leaves)


class ShapeWatch:
    """Tells when a step is about to compile: for its first inputs, and -- with a warning --
    when they change shape or dtype (the step then compiles again, seconds each time; with
    padded batches it never should).

    >>> import numpy as np
    >>> watch = ShapeWatch("the step")
    >>> watch.check({"x": np.zeros(3)}), watch.check({"x": np.ones(3)}), watch.check({"x": np.zeros(4)})
    (True, False, True)
    """

    def __init__(self, what: str):
        self.what = what
        self.signature = None

    def check(self, inputs) -> bool:
        """Whether the step compiles for ``inputs``."""
        signature = input_signature(inputs)
        if signature == self.signature:
            return False
        if self.signature is not None:
            logging.warning("%s will compile again: its inputs changed shape or dtype", self.what)
        self.signature = signature
        return True


class StopSignals:
    """Turns SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) into a request the loop reads
    between steps, so it stops at a consistent point -- the state of the last finished step,
    never one donated to a step in flight -- saves it, and then raises ``KeyboardInterrupt``.
    A second signal interrupts at once. Only the main thread can install handlers; elsewhere
    this does nothing.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:  # asked twice: stop now (the last saved checkpoint stays)
            logging.warning("second %s: stopping at once", signal.Signals(signum).name)
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("%s received: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
