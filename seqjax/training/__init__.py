"""Training: losses (the loop, state, parallelism and checkpointing land with the training issue)."""

from seqjax.training.losses import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy"]
