"""Gradient accumulation: what K micro-batches (`grad_accum_steps=K`) cost and save on one DecoderLM training step.

    python benchmarks/accumulation.py [--batch 64 --length 256 --width 256 --layers 4 --vocab 8192] [--repeats 5]

For K in 1, 2, 4, 8 (K=1 is the peer: the whole batch in one pass), prints the compiled temporary memory of the
step (XLA's memory analysis) and its median time, both as ratios to K=1, measured in the same run, interleaved. The
step is the loop's own (`make_train_step`: loss, gradients, AdamW) on a causal DecoderLM with cross-entropy.
"""

from __future__ import annotations

import argparse

import jax
import optax
from _timing import interleaved_medians

from seqjax.models import DecoderLM, TransformerConfig
from seqjax.training import TrainState, cross_entropy, make_train_step


def main():
    parser = argparse.ArgumentParser()
    for name, default in (("batch", 64), ("length", 256), ("width", 256), ("layers", 4), ("vocab", 8192)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ks", default="1,2,4,8")
    args = parser.parse_args()
    cfg = TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.width, num_heads=args.width // 64, num_layers=args.layers,
        mlp_dim=4 * args.width, max_len=args.length, dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip
    model = DecoderLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length + 1), 1, args.vocab)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = jax.jit(model.init)(jax.random.key(1), batch["inputs"][:1])["params"]

    def loss_fn(params, model_state, batch, rng):
        logits = model.apply({"params": params}, batch["inputs"])
        loss, _ = cross_entropy(logits, batch["targets"], as_mean=True)
        return loss, ({}, model_state)

    tx = optax.adamw(1e-3)
    with jax.numpy_dtype_promotion("standard"):
        state = TrainState.create(params, tx, jax.random.key(2))
        steps, temps = {}, {}
        for k in map(int, args.ks.split(",")):
            compiled = jax.jit(make_train_step(loss_fn, tx, grad_accum_steps=k)).lower(state, batch).compile()
            temps[k] = compiled.memory_analysis().temp_size_in_bytes
            steps[k] = lambda compiled=compiled: jax.block_until_ready(compiled(state, batch))
        times = interleaved_medians(steps, args.repeats)
    print(f"DecoderLM {args.layers} layers, width {args.width}, batch {args.batch} x {args.length}, vocab {args.vocab}")
    print(f"{'K':>3} {'temporaries':>12} {'vs K=1':>7} {'step':>8} {'vs K=1':>7}")
    for k in temps:
        t, m = times[k], temps[k]
        print(f"{k:>3} {m / 2**20:>9.0f} MiB {m / temps[1]:>7.2f} {t:>7.3f}s {t / times[1]:>7.2f}")


if __name__ == "__main__":
    main()
