"""A small task for the loop's tests, runnable as a script so tests can kill it:

python tests/training/toy_task.py WORKDIR [key=value ...]
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import optax

from seqjax.training.vectorized import hparam


def toy_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            seed=0, batch_size=16, num_train_steps=60, log_every_steps=1, eval_every_steps=20,
            checkpoint_every_steps=10, learning_rate=3e-3, parallel="none", optimizer="adam", schedule="cosine",
            warmup_steps=5, max_checkpoints_to_keep=3, nan_at_step=-1, sleep=0.0, dropout=0.1, keep_best_metric="",
            keep_best_mode="min", profile_steps="", fsdp=1, fsdp_min_size=64,
        )
    )  # fmt: skip
    config.update(overrides)
    return config


class ToyTask:
    """Regression y = tanh(x W1) W2 with dropout (so the PRNG matters) on batches indexed by step."""

    # May differ between trials stacked by a vectorised sweep: the dropout rate is read through `hparam`, and
    # nan_at_step changes only the data.
    vectorizable = ("dropout", "nan_at_step")

    def __init__(self, config):
        self.config = config
        self.key = jax.random.key(123)
        self.w_true = jax.random.normal(jax.random.fold_in(self.key, 7), (8, 1))

    def init(self, rng):
        k1, k2 = jax.random.split(rng)
        params = {
            "w1": jax.random.normal(k1, (8, 32)) * 0.3,
            "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 1)) * 0.3,
        }
        return params, {}

    def _batch(self, index, n):
        x = jax.random.normal(jax.random.fold_in(self.key, index), (n, 8))
        return {"x": x, "y": jnp.sin(x @ self.w_true)}

    def train_batch(self, index):
        if self.config.sleep:
            import time

            time.sleep(self.config.sleep)
        batch = self._batch(index, self.config.batch_size)
        if index + 1 == self.config.nan_at_step:
            batch["y"] = batch["y"] * jnp.nan
        return batch

    def process_batch(self, index):
        """This process's rows (the loop uses it when there are several processes)."""
        i, n = jax.process_index(), jax.process_count()
        rows = self.config.batch_size // n
        return jax.tree.map(lambda x: x[i * rows : (i + 1) * rows], self.train_batch(index))

    def eval_batches(self):
        return [self._batch(10**6 + i, 32) for i in range(2)]

    def _predict(self, params, x, rng=None):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        if rng is not None:
            keep = 1.0 - hparam(self.config, "dropout")  # a traced scalar in a vectorised sweep
            h = jnp.where(jax.random.bernoulli(rng, keep, h.shape), h / keep, 0.0)
        return h @ params["w2"]

    def loss_fn(self, params, model_state, batch, rng):
        loss = jnp.mean((self._predict(params, batch["x"], rng) - batch["y"]) ** 2)
        return loss, ({"mse": loss}, model_state)

    def metric_fn(self, params, model_state, batch):
        return {"loss": jnp.mean((self._predict(params, batch["x"]) - batch["y"]) ** 2)}

    def report(self, params, model_state, workdir):
        return {"w1_norm": float(optax.tree.norm(params["w1"]))}


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    devices = int(os.environ.get("TOY_DEVICES", "1"))
    jax.config.update("jax_num_cpu_devices", devices)
    from seqjax.training.loop import train_and_evaluate

    overrides = {}
    for arg in sys.argv[2:]:
        key, value = arg.split("=", 1)
        overrides[key] = type(toy_config()[key])(value)
    config = toy_config(**overrides)
    with jax.numpy_dtype_promotion("standard"):
        # Built by the loop after jax.distributed.initialize (JAX_* variables: one of several processes).
        train_and_evaluate(config, sys.argv[1], lambda: ToyTask(config))
