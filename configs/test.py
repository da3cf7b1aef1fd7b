"""A tiny CPU configuration for tests and smoke runs: a small model on the first molecules of
QM9 (processed on their own, in seconds), a few steps per epoch."""

from se3jax.training.config import default_config


def get_config():
    config = default_config()
    config.max_molecules = 400  # process only the first 400 QM9 molecules
    config.num_layers = 1
    config.num_degrees = 2
    config.num_channels = 8
    config.num_heads = 2
    config.batch_size = 16
    config.num_epochs = 2
    config.learning_rate = 3e-3
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 10
    config.log_every_steps = 5
    config.num_devices = 1  # deterministic step counts (tests may simulate more devices)
    config.progress_bar = False
    return config
