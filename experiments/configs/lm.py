"""lm, CPU default: a 2-layer Transformer of width 128 on synthetic_text words.

Variants: `:tiny_shakespeare`, `:lm1b` (the real datasets, prepared beforehand; see seqjax.data.datasets),
`:accelerator` (lm1b subwords at base size, for a GPU/TPU).
"""

import ml_collections

from experiments.common import base_config
from experiments.text_lm import text_config


def get_config(variant: str = "cpu"):
    c = base_config(
        batch_size=64,
        num_train_steps=2500,
        learning_rate=2e-3,
        warmup_steps=100,
        eval_every_steps=500,
        checkpoint_every_steps=500,
        weight_decay=0.01,
    )
    text_config(c)
    c.tokens, c.seq_len = "word", 24  # synthetic_text as words: at depth 3 a sentence has at most 21
    # TransformerConfig's fields (the task adds vocab_size, from the tokenizer, and max_len = seq_len + 1).
    # attention_dropout_rate is its own key (the task used dropout_rate for both before).
    c.model = ml_collections.ConfigDict(
        dict(
            emb_dim=128,
            num_heads=4,
            num_layers=2,
            mlp_dim=512,
            dropout_rate=0.0,
            attention_dropout_rate=0.0,
            position="learned",
            scan_layers=True,
            dtype="float32",  # compute dtype; "bfloat16": mixed precision, parameters stay float32
        )
    )
    if variant == "tiny_shakespeare":
        c.update(dict(dataset="tiny_shakespeare", seq_len=128, num_train_steps=5000))
    elif variant == "lm1b":
        c.update(dict(dataset="lm1b", seq_len=64, vocab_size=8000, num_train_steps=20_000))
    elif variant == "accelerator":
        c.update(
            dict(
                dataset="lm1b",
                seq_len=128,
                vocab_size=32_000,
                batch_size=256,
                num_train_steps=100_000,
                model=dict(
                    dtype="bfloat16",
                    emb_dim=512,
                    num_heads=8,
                    num_layers=6,
                    mlp_dim=2048,
                    dropout_rate=0.1,
                    attention_dropout_rate=0.1,
                ),
                parallel="jit",
            )
        )
    elif variant != "cpu":
        raise ValueError(f"unknown lm config variant {variant!r}; use cpu, tiny_shakespeare, lm1b or accelerator")
    return c
