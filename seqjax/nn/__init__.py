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
from seqjax.nn.sequence import (
    AutoregressiveModel,
    LatentAutoregressiveModel,
    MarkovModel,
    NaiveModel,
    markov_fit,
    markov_log_likelihood,
    markov_sample,
    predict_ahead,
)

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "AddSinusoidalPositions",
    "AutoregressiveModel",
    "Bidirectional",
    "GRUCell",
    "LSTMCell",
    "LatentAutoregressiveModel",
    "LearnedPositionEmbedding",
    "MarkovModel",
    "MlpBlock",
    "MultiHeadAttention",
    "NaiveModel",
    "SimpleRNN",
    "SimpleRNNCell",
    "apply_rotary",
    "causal_mask",
    "combine_masks",
    "flip_sequences",
    "markov_fit",
    "markov_log_likelihood",
    "markov_sample",
    "padding_mask",
    "predict_ahead",
    "rotary_frequencies",
    "scaled_dot_product_attention",
    "sinusoidal_embedding",
    "sinusoidal_positions",
    "sinusoidal_positions_2d",
]
