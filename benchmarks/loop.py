"""Overhead of `train_and_evaluate` against the bare jitted step.

    python benchmarks/loop.py [--size tiny|small|medium] [--steps 1000] [--repeats 3]

A small MLP regression task whose batches are slices of an array in host memory, as a data pipeline hands them
over (`--size tiny`: batch 64, 8 -> 256 -> 1, a step of tens of microseconds; `small`: batch 256, 256 -> 1024 -> 1,
about two milliseconds; `medium`: batch 256, 512 -> 2048 -> 1, about six). The loop draws each batch, logs every 100
steps (a device sync, a JSON line) and checkpoints every 100 steps with Orbax.

The peer is the same jitted train step called in a Python loop on batches already on the device. Both are timed in
the steady state, without compilation: the bare loop after one warm-up call; the loop by its own `steps_per_sec`
(metrics.jsonl) over every logged interval after the first, which holds the compilation. Each interval holds one
Orbax save. The loop is also run with checkpointing only at the end, which isolates the cost of the saves.
Medians over `--repeats` alternating runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from seqjax.training import Parallel, TrainState, make_optimizer, read_metrics, train_and_evaluate

SIZES = {"tiny": (64, 8, 256), "small": (256, 256, 1024), "medium": (256, 512, 2048)}  # batch, features, hidden
LOG_EVERY = 100


class Task:
    """y = sin(sum x) from 64 batches' worth of fixed inputs, cycled."""

    def __init__(self, config):
        self.config = config
        x = np.random.RandomState(0).randn(64 * config.batch_size, config.features).astype(np.float32)
        self.x, self.y = x, np.sin(x.sum(-1, keepdims=True))

    def init(self, rng):
        k1, k2 = jax.random.split(rng)
        h, f = self.config.hidden, self.config.features
        return {"w1": jax.random.normal(k1, (f, h)) * f**-0.5, "w2": jax.random.normal(k2, (h, 1)) * 0.1}, {}

    def train_batch(self, index):
        n = self.config.batch_size
        i = (index % 64) * n
        return {"x": self.x[i : i + n], "y": self.y[i : i + n]}

    def loss_fn(self, params, model_state, batch, rng):
        pred = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]
        return jnp.mean((pred - batch["y"]) ** 2), ({}, model_state)


def config(steps: int, size: str, checkpoint_every: int) -> ml_collections.ConfigDict:
    batch, features, hidden = SIZES[size]
    return ml_collections.ConfigDict(
        dict(
            seed=0, batch_size=batch, num_train_steps=steps, log_every_steps=LOG_EVERY, eval_every_steps=0,
            checkpoint_every_steps=checkpoint_every, learning_rate=1e-3, parallel="none", features=features,
            hidden=hidden,
        )
    )  # fmt: skip


def run_loop(steps: int, size: str, checkpoint_every: int) -> float:
    """Steady-state steps/s of the whole loop, from its own log."""
    workdir = tempfile.mkdtemp()
    try:
        cfg = config(steps, size, checkpoint_every)
        with contextlib.redirect_stdout(io.StringIO()):  # the loop's progress lines
            train_and_evaluate(cfg, workdir, Task(cfg))
        rows = read_metrics(workdir)
        seconds = [LOG_EVERY / r["steps_per_sec"] for s, r in rows.items() if s > LOG_EVERY and s % LOG_EVERY == 0]
        return len(seconds) * LOG_EVERY / sum(seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_bare(steps: int, size: str) -> float:
    cfg = config(steps, size, steps)
    task, tx = Task(cfg), make_optimizer(cfg)
    params, _ = task.init(jax.random.key(0))
    step = Parallel("none").train_step(task.loss_fn, tx)
    batches = [jax.device_put(task.train_batch(i)) for i in range(64)]
    state = Parallel("none").put_state(TrainState.create(params, tx, jax.random.key(1)))
    state, _ = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batches[i % 64])
    jax.block_until_ready((state, metrics))
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", choices=list(SIZES), default="small")
    args = p.parse_args()
    bare, loop, no_ckpt = [], [], []
    for _ in range(args.repeats):
        bare.append(run_bare(args.steps, args.size))
        loop.append(run_loop(args.steps, args.size, 100))
        no_ckpt.append(run_loop(args.steps, args.size, args.steps))
    ba, lo, nc = (statistics.median(x) for x in (bare, loop, no_ckpt))
    batch, features, hidden = SIZES[args.size]
    print(f"jax {jax.__version__}; {os.cpu_count()} cores; MLP {features}->{hidden}->1, batch {batch}; "
          f"{args.steps} steps, medians of {args.repeats}")  # fmt: skip
    print(f"  bare jitted step, device-resident batches:     {ba:9.1f} steps/s  ({1e3 / ba:.3f} ms/step)")
    print(f"  train_and_evaluate, Orbax save every 100 steps: {lo:9.1f} steps/s  = {lo / ba:.2f} of bare")
    print(f"  train_and_evaluate, saving only at the end:     {nc:9.1f} steps/s  = {nc / ba:.2f} of bare")
    print(f"  cost of one save: {1e3 * LOG_EVERY * (1 / lo - 1 / nc):.1f} ms")


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main()
