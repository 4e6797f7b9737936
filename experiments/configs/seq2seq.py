"""seq2seq on seq_tasks, CPU default: a 2+2-layer Transformer of width 64 learns to reverse sequences of 4-12 symbols
in a few minutes on two cores.

Variants: `--config experiments/configs/seq2seq.py:translation` (TED Portuguese -> English with subwords),
`:accelerator` (a base-size model on long sequences, for a GPU/TPU).
"""

import ml_collections

from experiments.common import base_config


def get_config(variant: str = "cpu"):
    c = base_config(
        batch_size=64,
        num_train_steps=1200,
        learning_rate=3e-3,
        warmup_steps=100,
        eval_every_steps=400,
        checkpoint_every_steps=400,
        log_every_steps=50,
    )
    c.dataset = "seq_tasks"  # or a TFDS translation dataset, e.g. "ted_hrlr_translate/pt_to_en"
    c.task = "reverse"  # seq_tasks: copy | reverse | sort | trim | omit | permute | addition
    c.subword_vocab_size = 8000  # translation: the shared SentencePiece vocabulary
    c.eval_split = "validation"  # translation
    c.vocab_size = 10  # symbols 1..vocab_size
    c.min_len, c.max_len = 4, 12
    c.max_digits = 3  # addition
    c.data_seed = 0
    c.num_train_examples = 20_000
    c.num_eval_examples = 512
    c.eval_batch_size = 256
    # TransformerConfig's fields (the task adds vocab_size and max_len, from the data). attention_dropout_rate is
    # its own key (the task used dropout_rate for both before).
    c.model = ml_collections.ConfigDict(
        dict(
            emb_dim=64,
            num_heads=4,
            num_layers=2,
            mlp_dim=256,
            dropout_rate=0.0,
            attention_dropout_rate=0.0,
            scan_layers=True,
            dtype="float32",  # compute dtype; "bfloat16": mixed precision, parameters stay float32
        )
    )
    c.label_smoothing = 0.0
    c.beam_size = 4
    if variant == "translation":  # prepared beforehand (see seqjax.data.datasets)
        c.update(
            dict(
                dataset="ted_hrlr_translate/pt_to_en",
                max_len=64,
                model=dict(
                    emb_dim=256, num_heads=4, num_layers=4, mlp_dim=1024, dropout_rate=0.1, attention_dropout_rate=0.1
                ),
                label_smoothing=0.1,
                num_train_steps=20_000,
                learning_rate=1e-3,
                warmup_steps=1000,
                num_eval_examples=512,
                eval_batch_size=128,
            )
        )
    elif variant == "accelerator":
        c.update(
            dict(
                batch_size=512,
                num_train_steps=20_000,
                model=dict(
                    dtype="bfloat16",
                    emb_dim=512,
                    num_heads=8,
                    num_layers=6,
                    mlp_dim=2048,
                    dropout_rate=0.1,
                    attention_dropout_rate=0.1,
                ),
                max_len=64,
                vocab_size=64,
                num_train_examples=1_000_000,
                parallel="jit",
            )
        )
    elif variant != "cpu":
        raise ValueError(f"unknown seq2seq config variant {variant!r}; use cpu, translation or accelerator")
    return c
