"""Layers for research code: attention, position encodings, feed-forward blocks, recurrent cells and layers."""

from seqjax.nn.attention import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    padding_mask,
    scaled_dot_product_attention,
    segment_mask,
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
from seqjax.nn.recurrent import (
    GRU,
    LSTM,
    RNN,
    Bidirectional,
    GRUCell,
    LSTMCell,
    SimpleRNN,
    SimpleRNNCell,
    flip_sequences,
)

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "AddSinusoidalPositions",
    "Bidirectional",
    "GRUCell",
    "LSTMCell",
    "LearnedPositionEmbedding",
    "MlpBlock",
    "MultiHeadAttention",
    "SimpleRNN",
    "SimpleRNNCell",
    "apply_rotary",
    "causal_mask",
    "combine_masks",
    "flip_sequences",
    "padding_mask",
    "rotary_frequencies",
    "scaled_dot_product_attention",
    "segment_mask",
    "sinusoidal_embedding",
    "sinusoidal_positions",
    "sinusoidal_positions_2d",
]
