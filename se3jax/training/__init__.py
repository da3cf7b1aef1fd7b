"""Training: steps, state, parallelism, checkpoints and the train-and-evaluate loop."""

from se3jax.training.steps import TrainState, create_train_state, make_eval_step, make_train_step, masked_l1
