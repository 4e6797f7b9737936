"""Running a whole sweep: its directory prepared once, then its unfinished trials through one engine.

`run_sweep(workdir, experiment, task_cls, module, base, variant, sweep, sweep_file, engine=...)` checks every
trial's config before anything runs, writes WORKDIR/sweep.json (a rerun must describe the same trials) and each
trial's directory and config file (`prepare`), and runs the trials not yet done:

- "local" (`run_local`): each trial a process of `python -m MODULE`, N at a time (`runner.run_trials`);
- vectorised (`run_vectorized`): all unfinished trials in this process as one vmapped program
  (`seqjax.training.vectorized`), for keys that do not change the program;
- "optuna" (`seqjax.sweeps.study.run_optuna`): a worker of a sweep shared through an Optuna study.

Results (`results.write_results`) are refreshed as trials finish and written at the end, also when interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import sys
import time
from typing import Any

from seqjax.errors import ConfigError
from seqjax.sweeps.results import describe, format_value, write_results
from seqjax.sweeps.runner import run_trials
from seqjax.sweeps.space import Sweep
from seqjax.sweeps.trial import (
    read_json,
    trial_config,
    trial_dir,
    trial_job,
    trial_lock,
    trial_status,
    update_trial,
    write_json,
    write_trial_config,
)

ENGINES = ("local", "optuna")


def prepare(
    workdir: str, experiment: str, base: str, variant: str | None, sweep: Sweep, sweep_file: str
) -> list[dict[str, Any]]:
    """Checks every trial's config before anything runs, and writes WORKDIR/sweep.json, the trial directories and
    their config files (a rerun must describe the same trials). Returns the trials' overrides."""
    from seqjax.training.loop import validate_config

    trials = sweep.trials()
    for i, overrides in enumerate(trials):
        try:
            validate_config(trial_config(base, variant, overrides))
        except ConfigError as e:  # printed as one line by the entry point
            raise ConfigError(e.key, f"{e.message} [trial {i}: {overrides}]") from None
        except ValueError as e:
            raise SystemExit(f"trial {i} ({overrides}): {e}") from None
    os.makedirs(workdir, exist_ok=True)
    record = {
        "experiment": experiment,
        "base_config": os.path.abspath(base),
        "variant": variant,
        "sweep_file": os.path.abspath(sweep_file),
        "metric": sweep.metric,
        "mode": sweep.mode,
        "trials": json.loads(json.dumps(trials, default=str)),
    }
    path = os.path.join(workdir, "sweep.json")
    old = read_json(path)
    if old is not None:
        same = {k: old.get(k) for k in ("experiment", "base_config", "variant", "trials")}
        if same != {k: record[k] for k in same}:
            raise SystemExit(
                f"{workdir} holds another sweep (sweep.json: experiment, base config or trials differ); "
                "use a new --workdir, or delete the old one"
            )
    write_json(path, record)
    for i, overrides in enumerate(trials):
        d = trial_dir(workdir, i)
        os.makedirs(d, exist_ok=True)
        note = f"Trial {i} of the sweep {os.path.abspath(sweep_file)}: {base}{':' + variant if variant else ''} with"
        write_trial_config(d, base, variant, overrides, note + f" {overrides}.")
        if not os.path.exists(os.path.join(d, "trial.json")):
            update_trial(d, index=i, overrides=overrides, status="pending", attempts=0)
    return trials


def run_local(workdir: str, module: str, trials: list[dict], todo: list[int], sweep: Sweep, parallel: int) -> None:
    """Each trial in `todo` a process of `python -m MODULE`, `parallel` at a time."""
    swept = sweep.swept_keys()
    jobs = [trial_job(workdir, module, i) for i in todo]
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if parallel > 1 else {}  # trials share an accelerator
    done = [0]

    def on_finish(i, info):
        done[0] += 1
        what = info["status"] if info["status"] != "failed" else f"FAILED: {info.get('error')}"
        metric = read_json(os.path.join(trial_dir(workdir, i), "summary.json"), {}).get(sweep.metric)
        value = f" {sweep.metric} {format_value(metric)}" if metric is not None and info["status"] == "done" else ""
        print(f"[{done[0]}/{len(jobs)}] {describe(i, trials[i], swept)}: {what}{value} ({info['seconds']:.0f} s)")
        sys.stdout.flush()
        write_results(workdir, sweep, trials)

    for i, d, _ in jobs:
        print(f"queued {describe(i, trials[i], swept)} (log: {os.path.join(d, 'log.txt')})")
    sys.stdout.flush()
    run_trials(jobs, parallel=parallel, env=env, on_finish=on_finish)


def run_vectorized(
    workdir: str, task_cls: type, base: str, variant: str | None, trials: list[dict], todo: list[int], swept: list[str]
) -> None:
    """All unfinished trials in this process, stacked (those another sweep process holds are left to it)."""
    from seqjax.training.vectorized import check_vectorizable, train_and_evaluate_many
    from seqjax.training.workdir import workdir_lock

    if "workdir" in inspect.signature(task_cls).parameters:
        raise SystemExit(f"{task_cls.__name__} trains stages of its own; it cannot be vectorised (run without it)")
    configs = {i: trial_config(base, variant, trials[i]) for i in todo}
    try:
        check_vectorizable(list(configs.values()), task_cls)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    with contextlib.ExitStack() as locks:
        mine = []
        for i in todo:
            d = trial_dir(workdir, i)
            if locks.enter_context(trial_lock(d)) and trial_status(d) != "done":
                locks.enter_context(workdir_lock(d))  # as its own run would: no other run writes there meanwhile
                mine.append(i)
            else:
                print(f"trial_{i:03d}: another sweep process has it; skipped")
        if not mine:
            return
        dirs = [trial_dir(workdir, i) for i in mine]
        print(
            f"training {len(mine)} trials stacked in one program: "
            + ", ".join(describe(i, trials[i], swept) for i in mine)
        )
        sys.stdout.flush()
        tasks = [task_cls(configs[i]) for i in mine]
        started = time.time()
        for d in dirs:
            info = read_json(os.path.join(d, "trial.json"), {})
            update_trial(d, status="running", attempts=info.get("attempts", 0) + 1, error=None, vectorized=True)
        try:
            summaries = train_and_evaluate_many([configs[i] for i in mine], dirs, tasks)
        except (Exception, KeyboardInterrupt, SystemExit) as e:
            for d in dirs:
                update_trial(d, status="pending")
            if isinstance(e, SystemExit) and not e.code:  # Ctrl-C or SIGTERM: every trial saved a checkpoint
                raise KeyboardInterrupt from None
            raise
        seconds = round(time.time() - started, 2)
        for d, s in zip(dirs, summaries, strict=True):
            if "error" in s:
                update_trial(d, status="failed", error=s["error"], seconds=seconds)
            else:
                update_trial(d, status="done", error=None, seconds=seconds)


def default_study_name(workdir: str, trials: list[dict]) -> str:
    """The workdir's name plus a hash of the trials: another sweep in the same database gets its own study."""
    digest = hashlib.sha1(json.dumps(trials, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{os.path.basename(workdir.rstrip('/'))}-{digest}"


def run_sweep(
    workdir: str,
    experiment: str,
    task_cls: type,
    module: str,
    base: str,
    variant: str | None,
    sweep: Sweep,
    sweep_file: str,
    *,
    engine: str = "local",
    parallel: int = 1,
    vectorize: bool = False,
    storage: str | None = None,
    study: str | None = None,
) -> list[dict[str, Any]]:
    """Prepares `workdir` and runs the unfinished trials of `sweep`, each an experiment (`task_cls`, run as
    `python -m MODULE` by the process engines) with the base config file `base` (`variant`) plus the trial's
    overrides. Returns the ranked rows of the results (also written to WORKDIR/results.*). Ctrl-C or SIGTERM: the
    running trials save a checkpoint, the results are written, and KeyboardInterrupt is raised."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    workdir = os.path.abspath(workdir)
    trials = prepare(workdir, experiment, base, variant, sweep, sweep_file)
    swept = sweep.swept_keys()
    todo = [i for i in range(len(trials)) if trial_status(trial_dir(workdir, i)) != "done"]
    print(
        f"sweep of {len(trials)} trials over {swept or 'nothing'} in {workdir}: "
        f"{len(trials) - len(todo)} finished, {len(todo)} to run"
    )
    sys.stdout.flush()
    try:
        if todo and engine == "optuna":
            from seqjax.sweeps.study import run_optuna

            name = study or default_study_name(workdir, trials)
            print(f"Optuna study {name!r} in {storage}")
            run_optuna(workdir, module, trials, todo, sweep, storage, name)
        elif todo and vectorize:
            run_vectorized(workdir, task_cls, base, variant, trials, todo, swept)
        elif todo:
            run_local(workdir, module, trials, todo, sweep, parallel)
    except KeyboardInterrupt:
        write_results(workdir, sweep, trials)
        raise
    return write_results(workdir, sweep, trials)


__all__ = ["ENGINES", "default_study_name", "prepare", "run_local", "run_sweep", "run_vectorized"]
