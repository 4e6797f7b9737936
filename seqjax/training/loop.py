"""`train_and_evaluate(config, workdir, task)`: the one training loop every experiment uses.

The loop knows no model and no dataset; a **task** brings them:

    task.init(rng) -> (params, model_state)
    task.loss_fn(params, model_state, batch, rng) -> (loss, (metrics, model_state))
    task.train_batch(index) -> the global batch number `index` (a pure function of the config and the index, so a
        resumed run reads exactly the batches an uninterrupted one would)
    task.process_batch(index) -> this process's rows of batch `index` (optional; used instead when there are several
        processes, so each reads only its own examples: `seqjax.data.Pipeline.process_batch`)
    task.eval_batches() -> iterable of batches            (optional, with metric_fn)
    task.metric_fn(params, model_state, batch) -> metrics (optional)
    task.report(params, model_state, workdir) -> dict     (optional: end-of-run numbers; may draw pictures;
        workdir is None on every process but the first)

Config fields (the shared contract): seed, batch_size, num_train_steps, log_every_steps, eval_every_steps (0: only
at the end), checkpoint_every_steps, learning_rate, parallel; the optimizer fields of `seqjax.training.optim`;
optional max_checkpoints_to_keep (None or missing: `Checkpointer`'s default), keep_best_metric / keep_best_mode
(keep-best checkpoints by an eval metric), profile_steps ("A,B": a jax.profiler trace of steps A+1..B in
WORKDIR/profile).

Reliability: the state (step, parameters, optimizer state, PRNG key, model state) is checkpointed with Orbax every
`checkpoint_every_steps` and at the end, and the loop resumes from the latest finished checkpoint in `workdir`;
per-step keys are `fold_in(key, step)` and batches are indexed by step, so a resumed run continues bitwise as an
uninterrupted one would (a finished run, rerun, evaluates once more so that its summary keeps the final
evaluation). SIGTERM saves a checkpoint at the next step boundary and exits with code 0. A non-finite
loss (checked at every log step and before every save) stops the run with the step number, keeping the last good
checkpoint.

Outputs: `metrics.jsonl` (one JSON object per logged step: step, train_loss, learning_rate, steps_per_sec, the
task's metrics, eval_* when evaluated; after a resume the last line for a step wins), the same rows as TensorBoard
scalars in `tensorboard/` (`tensorboard --logdir WORKDIR`), `summary.json`, `curves.png`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

from seqjax.errors import ConfigError
from seqjax.training.checkpoint import Checkpointer
from seqjax.training.metrics import accumulate
from seqjax.training.optim import learning_rate, make_optimizer, with_hyperparameters_of
from seqjax.training.parallel import MODES, Parallel, initialize_distributed
from seqjax.training.progress import StopRequest, print_progress
from seqjax.training.state import TrainState
from seqjax.training.summary import SummaryWriter
from seqjax.training.workdir import workdir_lock

REQUIRED = {
    "seed": int,
    "batch_size": int,
    "num_train_steps": int,
    "log_every_steps": int,
    "eval_every_steps": int,
    "checkpoint_every_steps": int,
    "learning_rate": float,
    "parallel": str,
}


def validate_config(config: Any) -> None:
    """The shared fields exist, have the right types and possible values; a `ConfigError` names the key."""
    for key, kind in REQUIRED.items():
        if key not in config:
            raise ConfigError(key, f"missing (every experiment config has {', '.join(sorted(REQUIRED))})")
        value = config[key]
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is float
            else isinstance(value, kind)
        )
        if not ok or isinstance(value, bool):
            raise ConfigError(key, f"{value!r} has the wrong type ({_KINDS[kind]})")
    for key in ("batch_size", "num_train_steps", "log_every_steps", "checkpoint_every_steps"):
        if config[key] < 1:
            raise ConfigError(key, f"{config[key]} is too small (an integer >= 1)")
    for key in ("eval_every_steps", "learning_rate"):
        if config[key] < 0:
            allowed = ">= 0; 0: only at the end" if key == "eval_every_steps" else ">= 0"
            raise ConfigError(key, f"{config[key]} is negative ({allowed})")
    if config.parallel not in MODES:
        raise ConfigError("parallel", f"{config.parallel!r} is unknown (one of {', '.join(map(repr, MODES))})")
    optional = (("fsdp", int), ("fsdp_min_size", int), ("distributed", bool), ("grad_accum_steps", int))
    for key, kind in (*optional, ("ema_decay", float)):
        value = config.get(key)
        numeric = kind in (int, float) and isinstance(value, bool)
        ok = isinstance(value, (int, float) if kind is float else kind) and not numeric
        if value is not None and not ok:
            raise ConfigError(key, f"{value!r} has the wrong type ({_KINDS[kind]})")
    if config.get("fsdp", 1) < 1 or (config.get("fsdp", 1) > 1 and config.parallel != "jit"):
        raise ConfigError("fsdp", f"{config.fsdp} is not possible here (>= 1, and above 1 only with parallel='jit')")
    if config.get("grad_accum_steps") is not None and config.grad_accum_steps < 1:
        raise ConfigError("grad_accum_steps", f"{config.grad_accum_steps} is too small (an integer >= 1; 1: off)")
    if config.get("ema_decay") is not None and not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError("ema_decay", f"{config.ema_decay} is out of range (in [0, 1); 0: off)")
    _profile_window(config)


def step_options(config: Any) -> dict[str, Any]:
    """The config's options of `make_train_step` (those it sets, not None; the rest keep `make_train_step`'s
    defaults)."""
    return {key: config[key] for key in ("grad_accum_steps", "ema_decay") if config.get(key) is not None}


_KINDS = {int: "an int", float: "a number", str: "a string", bool: "True or False"}


class _NoSummaries:
    def scalars(self, step, values):
        pass

    def flush(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _summary_writer(logdir: str, primary: bool):
    return SummaryWriter(logdir) if primary else _NoSummaries()


def _finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"train_loss is {value} at step {step}; stopped, the last good checkpoint is kept")


def train_and_evaluate(config: Any, workdir: str, task: Any) -> dict[str, Any]:
    """Trains `task` as `config` says, resuming from `workdir`; returns the summary (also in summary.json).

    `task` may also be a function of no arguments that builds the task: it is called once the config is checked,
    JAX's distributed runtime started (`initialize_distributed`, which must come before any array is made) and the
    workdir locked, so that a mistake in the config or a busy workdir stops the run before any data is read and a
    task may train stages of its own in the workdir. The experiment entry points pass one."""
    validate_config(config)
    initialize_distributed(config)
    workdir = os.path.abspath(workdir)
    with workdir_lock(workdir, enabled=jax.process_index() == 0):  # one writer per workdir (re-entrant)
        return _train_and_evaluate(config, workdir, task)


def _train_and_evaluate(config: Any, workdir: str, task: Any) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    par = Parallel.from_config(config)
    par.check_batch_size(config.batch_size, step_options(config).get("grad_accum_steps", 1))
    if not hasattr(task, "loss_fn") and callable(task):  # a function that builds the task
        task = task()
    primary = jax.process_index() == 0  # writes the logs, summaries and pictures; every process trains and saves
    tx = make_optimizer(config)
    root = jax.random.key(config.seed)
    params, model_state = task.init(jax.random.fold_in(root, 0))
    state = TrainState.create(params, tx, jax.random.fold_in(root, 1), model_state, ema=bool(config.get("ema_decay")))
    ckpt = Checkpointer.from_config(os.path.join(workdir, "checkpoints"), config)
    # Under "jit" the checkpoint is read straight into the mesh's shardings (each process its own shards).
    restored = ckpt.restore(state, shardings=par.state_shardings(state))  # skips damaged steps, or raises
    for line in ckpt.skipped if primary else ():
        print(line, flush=True)
    if restored is None:
        dev_state = par.put_state(state)
    else:  # the optimizer's numbers come from this config, not from the checkpoint
        host = restored[0].replace(opt_state=with_hyperparameters_of(restored[0].opt_state, state.opt_state))
        dev_state = host if par.mode == "jit" else par.put_state(host)
        if primary:
            print(f"resumed from step {int(restored[0].step)} in {workdir}", flush=True)
    train_step = par.train_step(task.loss_fn, tx, state, **step_options(config))
    eval_step = par.eval_step(task.metric_fn) if hasattr(task, "metric_fn") else None
    meta = {"config": json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)}

    def evaluate(dev_state) -> dict[str, float]:
        if eval_step is None:
            return {}
        # Sums over sums: a batch with fewer real tokens weighs less (seqjax.training.metrics).
        out = {}
        for prefix, s in dev_state.evaluated().items():  # the EMA parameters too, beside the raw ones
            results = accumulate(eval_step(s, par.put_batch(batch)) for batch in task.eval_batches())
            out.update({f"{prefix}{k}": v for k, v in results.items()})
        return out

    step, total = int(par.get_state(dev_state).step), config.num_train_steps
    profile = _profile_window(config)
    multiprocess = jax.process_count() > 1
    last_eval: dict[str, float] = {}
    if restored is not None and step >= total:  # a finished run rerun: its summary keeps the final evaluation
        last_eval = evaluate(dev_state)
    try:
        with (
            StopRequest(enabled=not multiprocess) as stop,  # several processes: Orbax's preemption sync point instead
            open(os.path.join(workdir, "metrics.jsonl") if primary else os.devnull, "a") as log,
            _summary_writer(os.path.join(workdir, "tensorboard"), primary) as tb,
        ):
            t_last, s_last = time.perf_counter(), step
            if multiprocess and hasattr(task, "process_batch"):  # each process reads only its own rows
                next_batch = lambda i: par.put_batch(task.process_batch(i), local=True)
            else:
                next_batch = lambda i: par.put_batch(task.train_batch(i))
            batch = next_batch(step) if step < total else None
            while step < total:
                if profile is not None and step == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                dev_state, metrics = train_step(dev_state, batch)  # dispatched asynchronously
                if step + 1 < total:  # the next batch is drawn while this step runs
                    batch = next_batch(step + 1)
                step += 1
                if profile is not None and step == profile[1]:
                    jax.block_until_ready(dev_state)
                    jax.profiler.stop_trace()
                    print(f"profile of steps {profile[0] + 1}..{step} in {workdir}/profile", flush=True)
                final = step == total
                row = None
                if step % config.log_every_steps == 0 or final:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    _finite(m["train_loss"], step)
                    now = time.perf_counter()
                    lr = float(learning_rate(par.get_state(dev_state.opt_state.hyperparams)))  # a few scalars
                    row = {"step": step, **m, "learning_rate": lr, "steps_per_sec": (step - s_last) / (now - t_last)}
                    t_last, s_last = now, step
                if (config.eval_every_steps and step % config.eval_every_steps == 0) or final:
                    last_eval = evaluate(dev_state)
                    row = {**(row or {"step": step}), **last_eval}
                if multiprocess:  # every process stops at the same step when any of them is told to
                    stop.requested = stop.requested or ckpt.manager.reached_preemption(step)
                if row is not None and primary:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    tb.scalars(step, {k: v for k, v in row.items() if k != "step"})
                    tb.flush()
                    print_progress(row, total)
                if step % config.checkpoint_every_steps == 0 or final or stop.requested:
                    host = par.get_state(dev_state)
                    loss = float(jax.device_get(metrics["train_loss"]))
                    _finite(loss, step)
                    ckpt.save(step, host, {**meta, "step": step}, metrics={"train_loss": loss, **last_eval})
                if stop.requested and not final:
                    ckpt.wait()
                    print(f"SIGTERM: saved step {step}; exiting", flush=True)
                    sys.exit(0)
    finally:  # a save in flight finishes (or a stop/NaN leaves the last good checkpoint complete)
        ckpt.close()
    summary = {"step": step, **last_eval}
    if hasattr(task, "report"):
        reported = dev_state.reported()  # the EMA parameters when kept
        params, model_state = par.to_host((reported.params, reported.model_state))
        report = task.report(params, model_state, workdir if primary else None)
        summary.update(report or {})
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot_curves(workdir)
    return summary


def _profile_window(config: Any) -> tuple[int, int] | None:
    """`config.profile_steps = "A,B"`: a `jax.profiler` trace of steps A+1..B, written to WORKDIR/profile."""
    spec = config.get("profile_steps")
    if not spec:
        return None
    try:
        start, end = (int(x) for x in str(spec).split(","))
    except ValueError:
        raise ConfigError("profile_steps", f'{spec!r} is not two steps ("START,END")') from None
    if not 0 <= start < end:
        raise ConfigError("profile_steps", f'{spec!r} is not a window of steps ("START,END" with 0 <= START < END)')
    return start, end


def read_metrics(workdir: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as {step: row}; after a resume the last line for a step wins."""
    rows: dict[int, dict[str, Any]] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return dict(sorted(rows.items()))


def plot_curves(workdir: str) -> str | None:
    """Train (and eval) loss against step from metrics.jsonl, to WORKDIR/curves.png."""
    rows = read_metrics(workdir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [s for s, r in rows.items() if "train_loss" in r]
    ax.plot(steps, [rows[s]["train_loss"] for s in steps], label="train loss")
    eval_steps = [s for s, r in rows.items() if "eval_loss" in r]
    if eval_steps:
        ax.plot(eval_steps, [rows[s]["eval_loss"] for s in eval_steps], marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(rows[s]["train_loss"] > 0 for s in steps):
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_curves", "read_metrics", "train_and_evaluate", "validate_config"]
