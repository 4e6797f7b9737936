"""Config of the attention demo: one attention layer learns to reverse a sequence of random tokens."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed for parameters and data
    c.vocab_size = 16  # tokens are drawn uniformly from [0, vocab_size)
    c.length = 12  # sequence length T
    c.emb_dim = 64  # model width D
    c.num_heads = 4  # attention heads N (must divide emb_dim)
    c.batch_size = 64  # global batch size
    c.num_train_steps = 400  # optimizer steps
    c.learning_rate = 3e-3  # Adam learning rate (with 10% linear warmup, then cosine decay)
    c.log_every_steps = 50  # print and append to metrics.jsonl every this many steps
    c.checkpoint_every_steps = 200  # Orbax checkpoint interval (a final one is always written)
    c.eval_batch_size = 512  # held-out examples for the final accuracy
    return c
