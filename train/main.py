"""Train the SE(3)-Transformer on QM9.

    python train/main.py --config configs/qm9.py --workdir runs/homo
    python train/main.py --config configs/qm9.py --config.num_epochs=1 --config.max_train_molecules=1000

Restarting with the same --workdir resumes from its last checkpoint; restarting a finished run
reports its stored results.
"""

import logging as std_logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before JAX is imported: glibc reads its settings at start
    from se3jax.host_memory import restart_with_training_allocator

    restart_with_training_allocator()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from se3jax.training.config import config_help  # noqa: E402
from se3jax.training.train import train_and_evaluate  # noqa: E402

__doc__ += "\n" + config_help()  # --help lists the execution options from their one definition

_CONFIG = config_flags.DEFINE_config_file("config", "configs/qm9.py", "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/qm9", "Where checkpoints, metrics and the resolved config go.")


class _QuietLibraries(std_logging.Filter):
    """Keep our INFO messages, drop the INFO chatter of orbax (one line per file it writes)."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("done: %s", results)


if __name__ == "__main__":
    app.run(main)
