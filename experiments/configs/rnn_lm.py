"""rnn_lm, CPU default: a one-layer LSTM of 256 units on synthetic_text characters.

Variants: `:tiny_shakespeare` (prepared beforehand; see seqjax.data.datasets), `:accelerator` (a 2-layer LSTM of
1024 units on tiny_shakespeare, for a GPU/TPU).
"""

import ml_collections

from experiments.common import base_config
from experiments.text_lm import text_config


def get_config(variant: str = "cpu"):
    c = base_config(
        batch_size=64,
        num_train_steps=1500,
        learning_rate=3e-3,
        warmup_steps=100,
        eval_every_steps=500,
        checkpoint_every_steps=500,
    )
    text_config(c)
    # RecurrentLMConfig's fields (the task adds vocab_size, from the tokenizer); cell: lstm | gru | rnn.
    c.model = ml_collections.ConfigDict(dict(cell="lstm", emb_dim=64, hidden_size=256, num_layers=1, dropout_rate=0.0))
    if variant == "tiny_shakespeare":
        c.update(dict(dataset="tiny_shakespeare", seq_len=128, num_train_steps=5000))
    elif variant == "accelerator":
        c.update(
            dict(
                dataset="tiny_shakespeare",
                seq_len=256,
                model=dict(hidden_size=1024, num_layers=2, dropout_rate=0.2),
                batch_size=256,
                num_train_steps=20_000,
                parallel="jit",
            )
        )
    elif variant != "cpu":
        raise ValueError(f"unknown rnn_lm config variant {variant!r}; use cpu, tiny_shakespeare or accelerator")
    return c
