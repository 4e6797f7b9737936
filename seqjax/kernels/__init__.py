"""How attention and recurrences are computed: one module per kernel, every name in `registry`.

Imports flow one way: kernels → nn → models; nothing here imports `seqjax.nn`. docs/ARCHITECTURE.md has the map and
how to add a kernel.
"""

from seqjax.kernels.gru import fused_gru
from seqjax.kernels.lstm import fused_lstm
from seqjax.kernels.registry import (
    ALIASES,
    ATTENTION,
    NAMES,
    RECURRENT,
    AttentionKernel,
    attention_kernel,
    gru_layer,
    lstm_layer,
)

__all__ = [
    "ALIASES",
    "ATTENTION",
    "NAMES",
    "RECURRENT",
    "AttentionKernel",
    "attention_kernel",
    "fused_gru",
    "fused_lstm",
    "gru_layer",
    "lstm_layer",
]
