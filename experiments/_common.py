"""What every experiment entry point shares: the command line, the shared config fields, the data directory, and
a task base that reads batches through `seqjax.data.Pipeline`.

An experiment module defines a task class (see `seqjax.training.loop`), `TASK` (that class), `CONFIG` (its default
config file, in experiments/configs) and a `main()` that calls `run(TASK, CONFIG)`; `python -m experiments.NAME
--workdir DIR [--config FILE] [--config.key=value ...]` then trains it with `seqjax.training.train_and_evaluate`,
resuming from DIR when it holds a checkpoint. `experiments.sweep` finds TASK and CONFIG by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def base_config(**fields: Any) -> ml_collections.ConfigDict:
    """The shared fields with CPU-friendly defaults, updated with `fields`."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameters, dropout and data order
    c.batch_size = 64  # global, split over devices and processes
    c.num_train_steps = 1000
    c.log_every_steps = 50  # metrics.jsonl, TensorBoard and the console
    c.eval_every_steps = 250  # 0: only at the end
    c.checkpoint_every_steps = 250  # Orbax; a final one is always written
    c.max_checkpoints_to_keep = 2
    c.learning_rate = 1e-3
    c.optimizer = "adamw"
    c.schedule = "cosine"
    c.warmup_steps = 50
    c.weight_decay = 0.0
    c.grad_clip_norm = 1.0
    c.parallel = "none"  # "none" | "pmap" | "jit"
    c.data_dir = ""  # TFDS data directory; "": TFDS's default (~/tensorflow_datasets)
    c.update(fields)
    return c


def data_dir(config: Any) -> str:
    import tensorflow_datasets as tfds

    return os.path.expanduser(config.get("data_dir") or tfds.core.constants.DATA_DIR)


def head(source: Any, n: int | None = None) -> list:
    """The first `n` examples of a random-access source (all of them when None), in one read."""
    from seqjax.data.pipeline import read_many

    return read_many(source, list(range(len(source) if n is None else min(n, len(source)))))


def eval_chunks(test: dict, n: int) -> list[dict]:
    """A held-out batch dict cut into whole batches of `n` rows (a remainder is left out)."""
    count = len(next(iter(test.values())))
    return [{k: v[i : i + n] for k, v in test.items()} for i in range(0, count - n + 1, n)]


def dropout_kwargs(rng: Any) -> dict:
    """`apply` keywords: training with dropout from `rng`, or deterministic evaluation when `rng` is None."""
    return {"deterministic": rng is None, "rngs": None if rng is None else {"dropout": rng}}


class PipelineTask:
    """A task whose training batches come from `self.pipeline` (a `seqjax.data.Pipeline`, prefetching) and whose
    held-out examples are `self.test` (a batch dict), evaluated in batches of `config.eval_batch_size`."""

    pipeline: Any
    test: dict
    config: Any

    def eval_batches(self) -> list[dict]:
        return eval_chunks(self.test, self.config.eval_batch_size)

    def train_batch(self, index: int) -> dict:
        if self.pipeline.process_count == 1:
            return self.pipeline(index)  # through the read-ahead thread
        return self.pipeline.batch(index)

    def process_batch(self, index: int) -> dict:
        return self.pipeline.process_batch(index)


def run(task_cls: type, default_config: str) -> None:
    """Parses the command line (flags are defined here, once, when run as a program) and trains."""
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and pictures go (reruns resume)", required=True)
    config_file = os.path.join(CONFIGS, default_config)  # a name in experiments/configs, or an absolute path
    config_flags.DEFINE_config_file("config", config_file, "experiment config")

    def main(argv):
        del argv
        from absl import logging

        if not any(a.startswith(("--verbosity", "-v")) for a in __import__("sys").argv):
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        import inspect

        from seqjax.training import train_and_evaluate
        from seqjax.training.parallel import initialize_distributed

        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        initialize_distributed(config)
        wants_workdir = "workdir" in inspect.signature(task_cls).parameters  # tasks with stages of their own
        task = task_cls(config, workdir=os.path.abspath(workdir)) if wants_workdir else task_cls(config)
        summary = train_and_evaluate(config, workdir, task)
        print(json.dumps(_jsonable(summary), indent=2))

    app.run(main)


def _jsonable(d: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}
