"""Orbax checkpoints of the full training state plus the data position, with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupt, truncated, or another model)."""


class Checkpointer:
    """Saves ``(state, meta)`` every time it is asked, keeps the newest ``keep``.

    ``state`` is any pytree of arrays (the TrainState); ``meta`` a small JSON dict (the data
    iterator position, the RNG seed). Writes are atomic: orbax writes to a temporary folder
    and renames it once complete, so an interrupted save leaves the previous checkpoint.
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        self._manager.wait_until_finished()
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Save (replacing a checkpoint of the same step, e.g. one taken at an epoch's end).

        The write runs in the background while training goes on: a synchronous save of the
        reference model's state stopped an H100 for 1.1-1.6 s each time. Orbax copies the
        arrays to host memory before this returns, so the next step may donate (overwrite)
        the state's buffers (tested). The previous save is finished first, and :meth:`close`
        waits for the last one.
        """
        self._manager.wait_until_finished()
        if int(step) in self._manager.all_steps():
            self._manager.delete(int(step))
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, abstract_state=None, step: int | None = None):
        """``(state, meta)`` of ``step`` (default: the latest), or ``None`` if there is none.

        ``abstract_state`` gives the expected structure, shapes and dtypes (e.g. a freshly
        initialised state); without it the saved tree comes back as nested dicts of arrays.
        Anything unreadable or mismatching raises :class:`CheckpointError`.
        """
        self._manager.wait_until_finished()
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        target = None if abstract_state is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
        except Exception as err:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({type(err).__name__}: "
                f"{str(err)[:300]}). It is corrupt or was written by a different model/config; "
                f"delete that folder to fall back to an older checkpoint, or use a new workdir."
            ) from err
        logging.info("restored checkpoint %s (step %d)", self.directory, step)
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        self._manager.close()
