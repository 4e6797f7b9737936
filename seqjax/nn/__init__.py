"""Layers for research code: attention, position encodings, feed-forward blocks."""

from seqjax.nn.attention import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    padding_mask,
    scaled_dot_product_attention,
)
from seqjax.nn.mlp import MlpBlock
from seqjax.nn.position import (
    AddSinusoidalPositions,
    LearnedPositionEmbedding,
    apply_rotary,
    rotary_frequencies,
    sinusoidal_embedding,
    sinusoidal_positions,
    sinusoidal_positions_2d,
)

__all__ = [
    "AddSinusoidalPositions",
    "LearnedPositionEmbedding",
    "MlpBlock",
    "MultiHeadAttention",
    "apply_rotary",
    "causal_mask",
    "combine_masks",
    "padding_mask",
    "rotary_frequencies",
    "scaled_dot_product_attention",
    "sinusoidal_embedding",
    "sinusoidal_positions",
    "sinusoidal_positions_2d",
]
