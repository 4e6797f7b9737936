"""K configurations trained inside one compiled program: `jax.vmap` over K stacked train states.

    summaries = train_and_evaluate_many(configs, workdirs, tasks)

On one accelerator, a small model leaves most of it idle; stacking K trials of a sweep fills it. The K configs may
differ only in what does not change the program:

  - the optimizer's numbers (`seqjax.training.optim.HYPERPARAMETERS` but `num_train_steps`: learning rate, schedule
    kind, warm-up, end factor, weight decay, b1, b2, momentum, clipping norm). They live in each trial's optimizer
    state (`optax.inject_hyperparams`), so one update function serves all K;
  - `seed` (initial parameters, dropout keys, data order: each trial has its own task, so its own batches);
  - the keys a task lists in its class attribute `vectorizable`: numbers its `loss_fn` / `metric_fn` read with
    `hparam(self.config, key)` (e.g. label smoothing), which under this trainer returns the trial's value as a
    traced scalar, or data-only keys (e.g. `data_seed`) that change the batches but not their shapes.

Each trial is logged and checkpointed as if it were its own run: WORKDIR_k/metrics.jsonl, tensorboard/,
checkpoints/ (restorable by `train_and_evaluate` with the same config), summary.json, curves.png. Per trial, the
losses equal those of a separate `train_and_evaluate` run (tests/training/test_vectorized.py). A trial whose loss
turns non-finite stops being logged and saved (its summary says why) while the others go on. Resuming restarts every
trial from the latest step all of them have a checkpoint of. One device (config.parallel = "none").
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.training.checkpoint import Checkpointer
from seqjax.training.loop import plot_curves, step_options, validate_config
from seqjax.training.metrics import Accumulator
from seqjax.training.optim import (
    HYPERPARAMETERS,
    learning_rate,
    make_optimizer,
    optimizer_structure,
    with_hyperparameters_of,
)
from seqjax.training.progress import StopRequest, print_progress
from seqjax.training.state import TrainState, make_eval_step, make_train_step
from seqjax.training.summary import SummaryWriter

# Config keys any task may vary between stacked trials.
VECTORIZABLE = (*(k for k in HYPERPARAMETERS if k != "num_train_steps"), "seed")

_TRACED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("seqjax_traced_hparams", default=None)


def hparam(config: Any, key: str) -> Any:
    """`config[key]`; inside a vectorised sweep's step, this trial's value of it as a traced scalar (for the keys
    the task lists in `vectorizable`). Tasks read such keys through this in `loss_fn` / `metric_fn`."""
    traced = _TRACED.get() or {}
    return traced[key] if key in traced else config[key]


@contextlib.contextmanager
def traced_hparams(values: dict[str, Any]):
    """Within the block, `hparam(config, key)` returns `values[key]` for the keys in `values`."""
    token = _TRACED.set({**(_TRACED.get() or {}), **values})
    try:
        yield
    finally:
        _TRACED.reset(token)


def _flat(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value

    walk("", d)
    return out


def varying_keys(configs: list[Any]) -> list[str]:
    """The (dotted) config keys whose values are not the same in every config."""
    flats = [_flat(c) for c in configs]
    keys = sorted(set().union(*flats))
    return [k for k in keys if any(f.get(k, "<missing>") != flats[0].get(k, "<missing>") for f in flats)]


def check_vectorizable(configs: list[Any], task_cls: type) -> list[str]:
    """Raises ValueError naming the keys that stop `configs` from training as one program; returns those that
    vary."""
    if not configs:
        raise ValueError("a vectorised sweep needs at least one config")
    allowed = set(VECTORIZABLE) | set(getattr(task_cls, "vectorizable", ()))
    varying = varying_keys(configs)
    bad = [k for k in varying if k not in allowed]
    if bad:
        raise ValueError(
            f"--vectorize: the trials differ in {bad}, which change the compiled program (shapes, structure, number "
            f"of steps); vectorisable keys for {task_cls.__name__}: {sorted(allowed)}. Sweep those keys as separate "
            "trials (without --vectorize), or nest: one vectorised sweep per value."
        )
    structures = [optimizer_structure(c) for c in configs]
    parts = ("optimizer", "clipping (grad_clip_norm > 0)", "sgd momentum (momentum > 0)", "sgd weight decay (> 0)")
    for part, values in zip(parts, zip(*structures, strict=True), strict=True):
        if len(set(values)) > 1:
            raise ValueError(
                f"--vectorize: the trials' optimizers differ in {part}: {sorted(set(values), key=str)}, which changes "
                "the optax chain; keep it the same in every trial (e.g. grad_clip_norm all 0 or all > 0)"
            )
    if any(c.parallel != "none" for c in configs):
        raise ValueError("--vectorize trains the stacked trials on one device: set config.parallel='none'")
    for key in ("keep_best_metric", "profile_steps"):
        if any(c.get(key) for c in configs):
            raise ValueError(f"--vectorize does not support config.{key}; set it to '' (or run without --vectorize)")
    return varying


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _stack_host(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def train_and_evaluate_many(configs: list[Any], workdirs: list[str], tasks: list[Any]) -> list[dict[str, Any]]:
    """Trains trial k (`configs[k]`, `tasks[k]`, logging to `workdirs[k]`) for every k in one vmapped program;
    returns the summaries (also in each WORKDIR_k/summary.json). See the module docstring."""
    if not (len(configs) == len(workdirs) == len(tasks)):
        raise ValueError("configs, workdirs and tasks must have the same length")
    for c in configs:
        validate_config(c)
    check_vectorizable(configs, type(tasks[0]))
    K, cfg, task0 = len(configs), configs[0], tasks[0]
    workdirs = [os.path.abspath(w) for w in workdirs]
    for w in workdirs:
        os.makedirs(w, exist_ok=True)
    txs = [make_optimizer(c) for c in configs]
    tx = txs[0]  # the same chain for all: their numbers are in the states
    # One compiled, vmapped initialisation for all K (vmapped random draws equal the per-key ones).
    roots = jnp.stack([jax.random.key_data(jax.random.key(c.seed)) for c in configs])
    init_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.wrap_key_data(r), 0))(roots)
    params, model_state = jax.jit(jax.vmap(task0.init))(init_keys)
    states = []
    for k, (c, tx_k) in enumerate(zip(configs, txs, strict=True)):
        root = jax.random.key(c.seed)
        p_k, ms_k = jax.tree.map(lambda x, k=k: x[k], (params, model_state))
        states.append(TrainState.create(p_k, tx_k, jax.random.fold_in(root, 1), ms_k, ema=bool(c.get("ema_decay"))))
    ckpts = [
        Checkpointer.from_config(os.path.join(w, "checkpoints"), c) for w, c in zip(workdirs, configs, strict=True)
    ]
    start = _common_step(ckpts)
    if start is not None:
        restored = [ck.restore(s, step=start)[0] for ck, s in zip(ckpts, states, strict=True)]
        states = [  # the optimizer's numbers come from each trial's config, not from its checkpoint
            r.replace(opt_state=with_hyperparameters_of(r.opt_state, s.opt_state))
            for r, s in zip(restored, states, strict=True)
        ]
        print(f"resumed {K} stacked trials from step {start}", flush=True)
    stacked = jax.device_put(_stack(states))
    task_keys = tuple(getattr(type(task0), "vectorizable", ()))
    # Trials that agree on the seed and the task's own keys read the same batches: each step reads one batch per
    # group (a learning-rate sweep: one), and the compiled step hands each trial its group's.
    signature = [json.dumps([c.seed, *(c[k] for k in task_keys)], default=str) for c in configs]
    firsts = list(dict.fromkeys(signature))
    readers = [tasks[signature.index(s)] for s in firsts]  # one task per group
    group = jnp.asarray([firsts.index(s) for s in signature])
    hps = {k: jnp.asarray([c[k] for c in configs]) for k in task_keys if isinstance(configs[0][k], (int, float))}

    def with_hparams(fn):
        def wrapped(hp, *args):
            with traced_hparams(hp):
                return fn(*args)

        return wrapped

    loss_fn = with_hparams(task0.loss_fn)
    options = step_options(configs[0])  # equal in every trial (they change the program)
    one_step = lambda state, batch, hp: make_train_step(lambda *a: loss_fn(hp, *a), tx, **options)(state, batch)
    per_trial = lambda batches: jax.tree.map(lambda x: x[group], batches)
    vstep = jax.jit(lambda s, b, hp: jax.vmap(one_step)(s, per_trial(b), hp), donate_argnums=0)
    veval = None
    if hasattr(task0, "metric_fn"):
        metric_fn = with_hparams(task0.metric_fn)
        one_eval = lambda state, batch, hp: make_eval_step(lambda *a: metric_fn(hp, *a))(state, batch)
        veval = jax.jit(lambda s, b, hp: jax.vmap(one_eval)(s, per_trial(b), hp))
    unstack = jax.jit(lambda s: [jax.tree.map(lambda x, k=k: x[k], s) for k in range(K)])
    metas = [{"config": json.loads(c.to_json()) if hasattr(c, "to_json") else dict(c)} for c in configs]

    def evaluate(state) -> list[dict[str, float]]:
        if veval is None:
            return [{} for _ in range(K)]
        out = [{} for _ in range(K)]
        for prefix, s in state.evaluated().items():  # as train_and_evaluate: the EMA parameters beside the raw ones
            accs = [Accumulator() for _ in range(K)]  # per trial, sums over sums as in train_and_evaluate
            for batches in zip(*(t.eval_batches() for t in readers), strict=True):
                m = jax.device_get(veval(s, _stack_host(list(batches)), hps))
                for k in range(K):
                    accs[k].add(jax.tree.map(lambda x, k=k: x[k], m))
            for k, acc in enumerate(accs):
                out[k].update({f"{prefix}{n}": v for n, v in acc.result().items()})
        return out

    def next_batch(i):
        return jax.device_put(_stack_host([t.train_batch(i) for t in readers]))

    step, total = int(states[0].step), cfg.num_train_steps
    failed: dict[int, str] = {}

    def check(k: int, loss: float, step: int) -> None:
        """A non-finite loss fails trial k: it is no longer logged or saved."""
        if k not in failed and not math.isfinite(loss):
            failed[k] = f"train_loss is {loss} at step {step}; stopped, the last good checkpoint is kept"

    last_eval: list[dict[str, float]] = [{} for _ in range(K)]
    logs = [open(os.path.join(w, "metrics.jsonl"), "a") for w in workdirs]
    writers = [SummaryWriter(os.path.join(w, "tensorboard")) for w in workdirs]
    try:
        with StopRequest(signals=(signal.SIGTERM, signal.SIGINT)) as stop:  # Ctrl-C too: saves every trial, exits
            t_last, s_last = time.perf_counter(), step
            batch = next_batch(step) if step < total else None
            while step < total:
                stacked, metrics = vstep(stacked, batch, hps)
                if step + 1 < total:
                    batch = next_batch(step + 1)
                step += 1
                final = step == total
                rows: list[dict | None] = [None] * K
                if step % cfg.log_every_steps == 0 or final:
                    m = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
                    lrs = np.asarray(learning_rate(stacked.opt_state))
                    now = time.perf_counter()
                    rate = (step - s_last) / (now - t_last)
                    t_last, s_last = now, step
                    for k in range(K):
                        check(k, float(m["train_loss"][k]), step)
                        rows[k] = {"step": step, **{n: float(v[k]) for n, v in m.items()}}
                        rows[k].update(learning_rate=float(lrs[k]), steps_per_sec=rate)
                if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or final:
                    last_eval = evaluate(stacked)
                    rows = [{**(r or {"step": step}), **e} for r, e in zip(rows, last_eval, strict=True)]
                for k, row in enumerate(rows):
                    if row is not None and k not in failed:
                        logs[k].write(json.dumps(row) + "\n")
                        logs[k].flush()
                        writers[k].scalars(step, {n: v for n, v in row.items() if n != "step"})
                        writers[k].flush()
                if rows[0] is not None:
                    _progress_many(rows, failed, total)
                if step % cfg.checkpoint_every_steps == 0 or final or stop.requested:
                    losses = np.asarray(jax.device_get(metrics["train_loss"]))
                    for k, state_k in enumerate(unstack(stacked)):
                        check(k, float(losses[k]), step)
                        if k not in failed:
                            ckpts[k].save(step, state_k, {**metas[k], "step": step})
                if stop.requested and not final:
                    for ck in ckpts:
                        ck.wait()
                    print(f"stopped: saved step {step} of {K} stacked trials; rerun to resume", flush=True)
                    sys.exit(0)
    finally:
        for ck in ckpts:
            ck.close()
        for f in logs:
            f.close()
        for w in writers:
            w.close()
    summaries = []
    finals = unstack(stacked)
    for k in range(K):
        if k in failed:
            summary = {"step": step, "error": failed[k]}
        else:
            summary = {"step": step, **last_eval[k]}
            if hasattr(tasks[k], "report"):
                reported = finals[k].reported()
                host = jax.device_get((reported.params, reported.model_state))
                summary.update(tasks[k].report(*host, workdirs[k]) or {})
            with open(os.path.join(workdirs[k], "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        plot_curves(workdirs[k])
        summaries.append(summary)
    return summaries


def _common_step(ckpts: list[Checkpointer]) -> int | None:
    """The latest step every trial has a checkpoint of, or None when no trial has one. Later checkpoints of some
    trials (a save interrupted between trials) are deleted: they are written again, the same. Trials with no step
    in common raise ValueError, deleting nothing."""
    steps = [set(ck.all_steps()) for ck in ckpts]
    if not any(steps):
        return None
    common = set.intersection(*steps)
    if not common:
        raise ValueError(
            "the stacked trials have no checkpoint step in common (latest steps "
            f"{[max(s) if s else None for s in steps]}): they cannot resume as one program; finish them without "
            "--vectorize, or delete the checkpoints of those to restart"
        )
    start = max(common)
    for ck, s in zip(ckpts, steps, strict=True):
        for st in sorted(s):
            if st > start:
                print(f"deleting step {st} of {ck.manager.directory}: the stacked trials resume from step {start}")
                ck.manager.delete(st)
    return start


def _progress_many(rows: list[dict | None], failed: dict[int, str], total: int) -> None:
    losses = np.array([r["train_loss"] for k, r in enumerate(rows) if r and "train_loss" in r and k not in failed])
    row: dict[str, Any] = {"step": rows[0]["step"]}
    if len(losses):
        row.update(train_loss_min=float(losses.min()), median=float(np.median(losses)), max=float(losses.max()))
    evals = [r.get("eval_loss") for k, r in enumerate(rows) if r and k not in failed and "eval_loss" in r]
    if evals:
        row["eval_loss_min"] = float(min(evals))
    if failed:
        row["failed"] = float(len(failed))
    print_progress(row, total)


__all__ = [
    "VECTORIZABLE",
    "check_vectorizable",
    "hparam",
    "traced_hparams",
    "train_and_evaluate_many",
    "varying_keys",
]
