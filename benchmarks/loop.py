"""Overhead of `train_and_evaluate` against the bare jitted step.

    python benchmarks/loop.py [--steps 600] [--repeats 3]

A small MLP regression task (`--size tiny`: batch 64, 8 -> 256 -> 1, a step of tens of microseconds; `--size
small`: batch 256, 256 -> 1024 -> 1, about two milliseconds), so the loop's own work shows: drawing the batch,
logging every 100 steps (a device sync), checkpointing every 100 steps with Orbax.
The peer is the same jitted train step called in a Python loop on batches already on the device. Both run
`--steps` steps after a warm-up; medians over `--repeats` alternating runs; steps/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from seqjax.training import Parallel, TrainState, make_optimizer, train_and_evaluate


class Task:
    def __init__(self, config):
        self.config = config
        self.key = jax.random.key(1)

    def init(self, rng):
        k1, k2 = jax.random.split(rng)
        h, f = self.config.hidden, self.config.features
        return {"w1": jax.random.normal(k1, (f, h)) * 0.3, "w2": jax.random.normal(k2, (h, 1)) * 0.1}, {}

    def train_batch(self, index):
        x = jax.random.normal(jax.random.fold_in(self.key, index), (self.config.batch_size, self.config.features))
        return {"x": x, "y": jnp.sin(x.sum(-1, keepdims=True))}

    def loss_fn(self, params, model_state, batch, rng):
        pred = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, ({}, model_state)


SIZES = {"tiny": (64, 8, 256), "small": (256, 256, 1024)}  # batch, features, hidden


def config(steps: int, size: str = "tiny") -> ml_collections.ConfigDict:
    batch, features, hidden = SIZES[size]
    return ml_collections.ConfigDict(
        dict(
            seed=0, batch_size=batch, num_train_steps=steps, log_every_steps=100, eval_every_steps=0,
            checkpoint_every_steps=100, learning_rate=1e-3, parallel="none", features=features, hidden=hidden,
        )
    )  # fmt: skip


def run_loop(steps: int, size: str) -> float:
    workdir = tempfile.mkdtemp()
    try:
        cfg = config(steps, size)
        train_and_evaluate(cfg.copy_and_resolve_references(), workdir, Task(cfg))  # compiles, warms up the caches
        shutil.rmtree(workdir)
        t0 = time.perf_counter()
        train_and_evaluate(cfg, workdir, Task(cfg))
        return steps / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_bare(steps: int, size: str) -> float:
    cfg = config(steps, size)
    task, tx = Task(cfg), make_optimizer(cfg)
    params, _ = task.init(jax.random.key(0))
    par = Parallel("none")
    step = par.train_step(task.loss_fn, tx)
    batches = [jax.device_put(task.train_batch(i)) for i in range(steps)]
    state = par.put_state(TrainState.create(params, tx, jax.random.key(1)))
    state, _ = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in batches:
        state, metrics = step(state, b)
    jax.block_until_ready((state, metrics))
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--size", choices=sorted(SIZES), default="tiny", help="tiny: 8->256 MLP, batch 64; small: 256->1024, batch 256"
    )
    args = p.parse_args()
    import contextlib
    import io

    loop, bare = [], []
    for _ in range(args.repeats):
        with contextlib.redirect_stdout(io.StringIO()):  # the loop's progress lines
            loop.append(run_loop(args.steps, args.size))
        bare.append(run_bare(args.steps, args.size))
    lo, ba = statistics.median(loop), statistics.median(bare)
    batch, features, hidden = SIZES[args.size]
    shape = f"MLP {features}->{hidden}->1, batch {batch}"
    print(f"jax {jax.__version__}; {os.cpu_count()} cores; {shape}; {args.steps} steps, medians of {args.repeats}")
    print(f"  bare jitted step, device-resident batches: {ba:8.1f} steps/s")
    print(f"  train_and_evaluate (data, logs, Orbax every 100): {lo:8.1f} steps/s  = {lo / ba:.2f} of bare")


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main()
