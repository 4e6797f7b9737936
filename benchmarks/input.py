"""Is input ever the bottleneck? The default experiments' pipelines against their train steps.

    python benchmarks/input.py [--experiments seq2seq,lm,...] [--batches 40] [--parts pipelines,builds]

For each experiment's default (CPU) config: the rate at which `seqjax.data.Pipeline` produces global batches on
the main thread (no read-ahead: the background thread only adds to this), the rate of the compiled train step on
a batch already in memory, and their ratio (the issue asks for at least 5). Also the cost of restoring the
iterator at a far position (index arithmetic: one permutation of the source's indices for the new epoch).
Datasets are built offline into --data_dir first (not timed).

`builds`: the seconds each offline builder takes for the tiny configs the data tests build (the figures those tests
used to assert; a timing assert fails on a loaded machine and tests no behaviour, so the figure lives here).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from seqjax.data.pipeline import Pipeline
from seqjax.training import Parallel, TrainState, make_optimizer

TASKS = {
    "seq2seq": "Seq2SeqTask",
    "lm": "LMTask",
    "rnn_lm": "RNNLMTask",
    "vit": "ViTTask",
    "vqvae": "VQVAETask",
    "sequence_models": "SequenceModelsTask",
}


def measure(name: str, data_dir: str, batches: int) -> dict:
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    config.data_dir = data_dir
    task = getattr(importlib.import_module(f"experiments.{name}"), TASKS[name])(config)
    pipe: Pipeline = task.pipeline
    fresh = Pipeline(pipe.source, pipe.batch_size, seed=pipe.seed, collate=pipe.collate, process_index=0,
                     process_count=1)  # fmt: skip
    fresh.batch(0)  # first reads open the files
    t0 = time.perf_counter()
    for i in range(1, batches + 1):
        fresh.batch(i)
    input_rate = batches / (time.perf_counter() - t0)
    far = 1000 * pipe.num_examples // pipe.batch_size + 7  # a step in epoch ~1000: a permutation not yet drawn
    t0 = time.perf_counter()
    fresh.batch(far)
    restore = time.perf_counter() - t0

    tx = make_optimizer(config)
    params, model_state = task.init(jax.random.key(0))
    par = Parallel("none")
    step = par.train_step(task.loss_fn, tx)
    state = par.put_state(TrainState.create(params, tx, jax.random.key(1), model_state))
    batch = jax.device_put(fresh.batch(0))
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_rate = 1.0 / statistics.median(times)
    pipe.close()
    return dict(input=input_rate, step=step_rate, ratio=input_rate / step_rate, restore=restore,
                batch=pipe.batch_size, examples=pipe.num_examples)  # fmt: skip


def tiny_builds() -> dict:
    """(dataset, tiny config) for each build in tests/data, configured as those tests configure them."""
    from seqjax.data.builders import captioned_shapes, seq_tasks, synthetic_text, time_series

    small = {"min_len": 5, "max_len": 9, "vocab_size": 7}
    builds = {
        f"seq_tasks/{t}": ("seq_tasks", seq_tasks.config(t, num_train=64, num_test=16, **small))
        for t in seq_tasks.TASKS
    }
    builds["synthetic_text"] = (
        "synthetic_text",
        synthetic_text.SyntheticTextConfig(name="tiny", num_train=128, num_test=16),
    )
    for kind in time_series.KINDS:
        config = time_series.TimeSeriesConfig(name=f"{kind}_tiny", kind=kind, num_train=64, num_test=8, length=96)
        builds[f"time_series/{kind}"] = ("time_series", config)
    config = captioned_shapes.CaptionedShapesConfig(name="tiny", seed=0, num_train=64, num_test=16)
    builds["captioned_shapes"] = ("captioned_shapes", config)
    return builds


def measure_builds() -> None:
    """Seconds per tiny offline build, each into a fresh folder (so nothing is reused)."""
    from absl import logging

    from seqjax.data.builders import build

    logging.set_verbosity(logging.ERROR)  # TFDS's notes on every custom config
    print(f"{'tiny build':28s} {'seconds':>8s}")
    for name, (dataset, config) in tiny_builds().items():
        with tempfile.TemporaryDirectory() as data_dir:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # TFDS's "Downloading and preparing ..." lines
                build(dataset, data_dir, config)
            print(f"{name:28s} {time.perf_counter() - t0:8.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", default=",".join(TASKS))
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    p.add_argument("--parts", default="pipelines,builds", help="pipelines (against the train step), builds (tiny)")
    args = p.parse_args()
    parts = args.parts.split(",")
    if "builds" in parts:
        measure_builds()
    if "pipelines" not in parts:
        return
    print(f"jax {jax.__version__}; {os.cpu_count()} cores; default CPU configs; data in {args.data_dir}")
    print(f"{'experiment':16s} {'batch':>5s} {'input batches/s':>16s} {'train steps/s':>14s} {'ratio':>7s} "
          f"{'restore at a far step':>22s}")  # fmt: skip
    for name in args.experiments.split(","):
        r = measure(name, args.data_dir, args.batches)
        print(f"{name:16s} {r['batch']:5d} {r['input']:16.1f} {r['step']:14.2f} {r['ratio']:7.1f} "
              f"{1e3 * r['restore']:19.1f} ms")  # fmt: skip


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main()
