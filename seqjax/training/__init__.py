"""Training: losses, optimizers from config, the train state and pure steps, and the parallel modes.

The loop (`train_and_evaluate`), Orbax checkpointing and metric writers land next (see docs/ARCHITECTURE.md).
"""

from seqjax.training.losses import cross_entropy, fused_linear_cross_entropy, mean_squared_error
from seqjax.training.optim import decay_mask, learning_rate, make_optimizer, make_schedule
from seqjax.training.parallel import Parallel
from seqjax.training.state import TrainState, make_eval_step, make_train_step

__all__ = [
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
]
