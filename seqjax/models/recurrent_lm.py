"""Recurrent language model: token embedding, a stacked LSTM / GRU / simple RNN (PyTorch semantics), logits.

Glossary: B batch, T length, E embedding width, H hidden width, V vocabulary, L layers.

The carried state plays the KV cache's role in `seqjax.decoding`: `RNNStep(model)` reads tokens from the state
`{"params", "carry"}` that `rnn_state` makes, so the same greedy / sampling / beam-search loops drive it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.models.config_base import ConfigBase, check_positive_ints, check_rates
from seqjax.nn.recurrent import GRU, LSTM, SimpleRNN

Array = jax.Array
CELLS = {"lstm": LSTM, "gru": GRU, "rnn": SimpleRNN}


@dataclasses.dataclass(frozen=True)
class RecurrentLMConfig(ConfigBase):
    """Attributes:
    vocab_size: V.
    emb_dim: E.
    hidden_size: H.
    num_layers: L.
    cell: "lstm", "gru" or "rnn".
    dropout_rate: dropout on the embeddings, between layers and before the logits, in [0, 1).
    """

    vocab_size: int
    emb_dim: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "lstm"
    dropout_rate: float = 0.0

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "emb_dim", "hidden_size", "num_layers"))
        if self.cell not in CELLS:
            raise ValueError(f"RecurrentLMConfig.cell={self.cell!r} is unknown; use one of {sorted(CELLS)}")
        check_rates(self, ("dropout_rate",))


class RecurrentLM(nn.Module):
    """`(tokens [B, T], initial_state=None, deterministic=True) -> (logits [B, T, V], final_state)`; `logits[:, t]`
    depends on `tokens[:, :t+1]` and predicts `tokens[:, t+1]`. States are the stacked layer's: h `[L, B, H]`
    (GRU, RNN) or (h, c) (LSTM); None starts from zeros."""

    config: RecurrentLMConfig

    @nn.compact
    def __call__(self, tokens: Array, initial_state: Any = None, deterministic: bool = True):
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids [B, T], got shape {tokens.shape} dtype {tokens.dtype}")
        x = nn.Embed(cfg.vocab_size, cfg.emb_dim, name="embed")(tokens)  # [B, T, E]
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        rnn = CELLS[cfg.cell](cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout_rate, name="rnn")
        x, state = rnn(x, initial_state=initial_state, deterministic=deterministic)  # [B, T, H]
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return nn.Dense(cfg.vocab_size, name="logits")(x), state


@dataclasses.dataclass(frozen=True)
class RNNStep:
    """Step function of a `RecurrentLM` over `rnn_state(...)`: `{"params", "carry"}`."""

    model: RecurrentLM

    def __call__(self, state: Any, tokens: Array) -> tuple[Array, Any]:
        logits, carry = self.model.apply({"params": state["params"]}, tokens, state["carry"])
        return logits, {"params": state["params"], "carry": carry}

    def batch_axes(self, state: Any) -> Any:
        """For beam search: parameters have no batch axis, every carry leaf `[L, B, H]` has it at 1."""
        return {
            "params": jax.tree.map(lambda _: None, state["params"]),
            "carry": jax.tree.map(lambda _: 1, state["carry"]),
        }


def rnn_state(model: RecurrentLM, params: Any, batch_size: int) -> dict:
    """Zero carry for `batch_size` sequences, with the parameters. The batch axis of every carry leaf is 1."""
    cfg = model.config
    h = jnp.zeros((cfg.num_layers, batch_size, cfg.hidden_size), jnp.float32)
    return {"params": params, "carry": (h, h) if cfg.cell == "lstm" else h}
