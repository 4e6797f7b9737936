"""Attention demo: one multi-head attention layer learns to reverse a sequence of random tokens.

    python -m experiments.attention_demo --workdir runs/attention_demo [--config.num_train_steps=200]

Reversal cannot be solved token by token: every output position must find the input at the mirrored position, so
the trained attention maps draw an anti-diagonal. Writes WORKDIR/metrics.jsonl, summary.json, Orbax checkpoints
under WORKDIR/checkpoints, attention.png (one panel per head) and loss.png. Rerunning the same command resumes
from the last checkpoint. The training-system issue replaces this loop with `seqjax.training.train_and_evaluate`.
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from seqjax.nn import MultiHeadAttention, sinusoidal_positions

_WORKDIR = flags.DEFINE_string("workdir", None, "directory for metrics, checkpoints and pictures", required=True)
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "attention_demo.py"), "experiment config"
)


class Reverser(nn.Module):
    """Token embedding + sinusoidal positions → one MultiHeadAttention layer → logits over the vocabulary."""

    vocab_size: int
    emb_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, tokens):  # tokens [B, T] int
        x = nn.Embed(self.vocab_size, self.emb_dim)(tokens)  # [B, T, D]
        x = x + sinusoidal_positions(tokens.shape[1], self.emb_dim)
        x = x + MultiHeadAttention(num_heads=self.num_heads, name="attention")(nn.LayerNorm()(x))
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))  # [B, T, V]


def make_batch(config: ml_collections.ConfigDict, key: jax.Array, batch_size: int):
    tokens = jax.random.randint(key, (batch_size, config.length), 0, config.vocab_size)
    return tokens, tokens[:, ::-1]


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from WORKDIR/checkpoints if present) and returns the summary metrics."""
    if config.emb_dim % config.num_heads:
        raise ValueError(f"config.num_heads ({config.num_heads}) must divide config.emb_dim ({config.emb_dim})")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    model = Reverser(config.vocab_size, config.emb_dim, config.num_heads)
    root = jax.random.key(config.seed)
    params = model.init(jax.random.fold_in(root, 0), jnp.zeros((1, config.length), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(1, config.num_train_steps // 10), config.num_train_steps
    )
    tx = optax.adam(schedule)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    if manager.latest_step() is not None:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
        print(f"resumed from step {int(state['step'])}")

    def loss_fn(params, tokens, targets):
        logits = model.apply({"params": params}, tokens)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == targets)

    @jax.jit
    def train_step(state, key):
        tokens, targets = make_batch(config, key, config.batch_size)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], tokens, targets)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        return new, {"train_loss": loss, "train_accuracy": acc}

    data_key = jax.random.fold_in(root, 1)  # batch i is drawn from fold_in(data_key, i): resuming replays nothing
    t0, step = time.time(), int(state["step"])
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as log:
        while step < config.num_train_steps:
            state, metrics = train_step(state, jax.random.fold_in(data_key, step))
            step += 1
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                m = {k: float(v) for k, v in metrics.items()}
                if not np.isfinite(m["train_loss"]):
                    raise FloatingPointError(f"loss is {m['train_loss']} at step {step}; last checkpoint kept")
                print(
                    f"step {step:5d}/{config.num_train_steps}  loss {m['train_loss']:.4f}  "
                    f"accuracy {m['train_accuracy']:.3f}  ({time.time() - t0:.1f}s)",
                    flush=True,
                )
                log.write(json.dumps({"step": step, **m}) + "\n")
                log.flush()
            if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
                manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()

    tokens, targets = make_batch(config, jax.random.fold_in(root, 2), config.eval_batch_size)
    logits, inter = model.apply({"params": state["params"]}, tokens, mutable=["intermediates"])
    summary = {
        "step": step,
        "eval_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == targets)),
        "eval_loss": float(optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    weights = np.asarray(inter["intermediates"]["attention"]["attention_weights"][0][0])  # [N, T, T]
    plot(workdir, weights, tokens[0])
    print(f"eval accuracy {summary['eval_accuracy']:.3f}; wrote {workdir}/summary.json, attention.png, loss.png")
    return summary


def plot(workdir: str, weights: np.ndarray, tokens) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, t = weights.shape[0], weights.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.6), squeeze=False)
    inputs = [str(int(x)) for x in tokens]
    outputs = [f"{i}: {int(x)}" for i, x in enumerate(tokens[::-1])]  # position: the token it should emit
    for h, ax in enumerate(axes[0]):
        ax.imshow(weights[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}")
        ax.set_xticks(range(t), inputs, fontsize=6)
        ax.set_yticks(range(t), outputs if h == 0 else [""] * t, fontsize=6)
        ax.set_xlabel("key: input token")
    axes[0][0].set_ylabel("query position: target token")
    fig.suptitle("attention weights after training to reverse the sequence")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "attention.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    last = {r["step"]: r for r in rows}  # after a resume the last line for a step wins
    steps = sorted(last)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, [last[s]["train_loss"] for s in steps], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
