"""Training: losses, optimizers from config, the train state and pure steps, the parallel modes, Orbax
checkpoints, and the one loop (`train_and_evaluate`)."""

from seqjax.training.checkpoint import Checkpointer
from seqjax.training.loop import read_metrics, train_and_evaluate, validate_config
from seqjax.training.losses import cross_entropy, fused_linear_cross_entropy, mean_squared_error
from seqjax.training.metrics import Mean
from seqjax.training.optim import decay_mask, learning_rate, make_optimizer, make_schedule
from seqjax.training.parallel import Parallel
from seqjax.training.state import TrainState, make_eval_step, make_train_step

__all__ = [
    "Checkpointer",
    "Mean",
    "Parallel",
    "TrainState",
    "cross_entropy",
    "decay_mask",
    "fused_linear_cross_entropy",
    "learning_rate",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "mean_squared_error",
    "read_metrics",
    "train_and_evaluate",
    "validate_config",
]
