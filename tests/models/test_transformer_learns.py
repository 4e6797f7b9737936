"""A tiny Transformer learns to reverse sequences (exact match of greedy decoding above 0.95). Reversing needs what
copying needs (attention to the source by position) and more, so copying, tested here before, is not repeated."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax import decoding
from seqjax.models import Seq2SeqStep, Transformer, TransformerConfig, seq2seq_state

V, L = 10, 6  # tokens 1..9 (0 is padding / start), length 6


def _batch(key, batch):
    inputs = jax.random.randint(key, (batch, L), 1, V)
    return inputs, inputs[:, ::-1]


@pytest.mark.slow
def test_tiny_transformer_learns_to_reverse(rng):
    cfg = TransformerConfig(
        vocab_size=V, emb_dim=32, num_heads=2, num_layers=2, mlp_dim=64, max_len=L, dropout_rate=0.0,
        attention_dropout_rate=0.0, scan_layers=True,
    )  # fmt: skip
    model = Transformer(cfg)
    inputs, targets = _batch(rng, 2)
    params = jax.jit(model.init)(rng, inputs, targets)["params"]
    tx = optax.adam(3e-3)

    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        opt_state = tx.init(params)

        @jax.jit
        def train_step(params, opt_state, key):
            inputs, targets = _batch(key, 64)

            def loss_fn(params):
                logits = model.apply({"params": params}, inputs, targets)
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        for i in range(300):
            params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(rng, i))

    inputs, targets = _batch(jax.random.key(1234), 256)
    state = seq2seq_state(model, params, inputs, L)
    out = decoding.greedy(Seq2SeqStep(model), state, jnp.zeros((256, 1), jnp.int32), L)
    accuracy = float(np.mean(np.all(np.asarray(out) == np.asarray(targets), axis=1)))
    assert accuracy > 0.95, f"exact-match accuracy {accuracy:.3f} after training (final loss {loss:.4f})"
