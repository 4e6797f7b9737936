"""sweep: a hyperparameter sweep over any experiment, each trial a run of its own.

    python -m experiments.sweep --experiment seq2seq --workdir runs/sweep_lr --sweep experiments/sweeps/seq2seq_lr.py
        [--config FILE[:VARIANT]] [--parallel N] [--vectorize] [--dry_run]

The sweep file (see `seqjax.training.sweep`) gives a grid, a product, a list or random / log-uniform draws over config
keys. Trial i trains in WORKDIR/trial_{i:03d} with the experiment's base config (its default, or --config) plus the
trial's overrides (written to trial_XXX/config.py: `python -m experiments.NAME --workdir WORKDIR/trial_XXX --config
WORKDIR/trial_XXX/config.py` reruns it alone). Trials run as separate processes, N at a time (`--parallel N`); each
logs to trial_XXX/log.txt and resumes from its checkpoint. Rerunning the same command skips finished trials and
resumes unfinished ones (a failed trial is tried again); a failing trial is recorded with its error and the others go
on; the exit code is 1 when a trial failed. Results, refreshed as trials finish: WORKDIR/results.csv, results.md
(sorted by the sweep's metric), metric_vs_KEY.png for each swept key, curves.png.

--vectorize trains all unfinished trials in this process as one program (`jax.vmap` over stacked train states; see
`seqjax.training.vectorized`), for sweeps over keys that do not change shapes (learning rate, schedule, warm-up,
weight decay, Adam's b1 / b2, clipping norm, seed, and what the experiment's task lists in `vectorizable`); every
trial is still logged and checkpointed in its own directory.

--engine optuna --storage URL: several machines share the sweep through an Optuna study in a shared database
(`pip install seqjax[sweep]`; e.g. --storage postgresql://host/db, or sqlite:///WORKDIR/optuna.db on one machine or
a shared file system). Every worker runs the same command: the first enqueues the trials of the sweep file, and each
worker takes waiting trials until none is left, running each exactly as above in WORKDIR/trial_XXX (WORKDIR on a file
system all workers see). A trial whose worker died (no heartbeat for 120 s) is enqueued again when a worker starts
(rerun the command anywhere): it resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import json
import os
import random
import sys
import time

from absl import app, flags

from seqjax.errors import ConfigError
from seqjax.training import sweep as sw
from seqjax.training.workdir import workdir_lock

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None, "experiment module: a name under experiments/ or a dotted module path")
flags.DEFINE_string("workdir", None, "the sweep's directory (trials go to WORKDIR/trial_XXX)")
flags.DEFINE_string("sweep", None, "sweep file (Python, get_sweep() -> seqjax.training.sweep.Sweep)")
flags.DEFINE_string("config", None, "base config FILE[:VARIANT] (default: the experiment's own)")
flags.DEFINE_integer("parallel", 1, "trials run at once (separate processes)")
flags.DEFINE_bool("vectorize", False, "train all unfinished trials as one vmapped program")
flags.DEFINE_bool("dry_run", False, "print the trials and exit")
flags.DEFINE_enum("engine", "local", ["local", "optuna"], "local processes, or workers sharing an Optuna study")
flags.DEFINE_string("storage", None, "--engine optuna: the study's database URL")
flags.DEFINE_string("study", None, "--engine optuna: the study's name (default: workdir name + hash of the trials)")


def experiment_module(name: str):
    """`experiments.NAME`, or a dotted module path; it must define TASK (the task class) and CONFIG (its default
    config file, relative to experiments/configs or absolute)."""
    module = importlib.import_module(name if "." in name else f"experiments.{name}")
    if not hasattr(module, "TASK") or not hasattr(module, "CONFIG"):
        raise ValueError(f"{module.__name__} is not an experiment module (it needs TASK and CONFIG)")
    return module


def default_config_path(module) -> str:
    from experiments._common import CONFIGS

    return module.CONFIG if os.path.isabs(module.CONFIG) else os.path.join(CONFIGS, module.CONFIG)


def split_config(spec: str) -> tuple[str, str | None]:
    """FILE[:VARIANT] -> (FILE, VARIANT or None)."""
    path, sep, variant = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, variant
    return spec, None


def prepare(workdir: str, experiment: str, base: str, variant: str | None, sweep: sw.Sweep, sweep_file: str):
    """Checks every trial's config before anything runs, and writes WORKDIR/sweep.json, the trial directories and
    their config files (a rerun must describe the same trials)."""
    from seqjax.training.loop import validate_config

    trials = sweep.trials()
    for i, overrides in enumerate(trials):
        try:
            validate_config(sw.trial_config(base, variant, overrides))
        except ConfigError as e:  # printed as one line by main
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
    old = sw.read_json(path)
    if old is not None:
        same = {k: old.get(k) for k in ("experiment", "base_config", "variant", "trials")}
        if same != {k: record[k] for k in same}:
            raise SystemExit(
                f"{workdir} holds another sweep (sweep.json: experiment, base config or trials differ); "
                "use a new --workdir, or delete the old one"
            )
    sw.write_json(path, record)
    for i, overrides in enumerate(trials):
        d = sw.trial_dir(workdir, i)
        os.makedirs(d, exist_ok=True)
        note = f"Trial {i} of the sweep {os.path.abspath(sweep_file)}: {base}{':' + variant if variant else ''} with"
        sw.write_trial_config(d, base, variant, overrides, note + f" {overrides}.")
        if not os.path.exists(os.path.join(d, "trial.json")):
            sw.update_trial(d, index=i, overrides=overrides, status="pending", attempts=0)
    return trials


def _describe(i: int, overrides: dict, swept: list[str]) -> str:
    return f"trial_{i:03d} " + " ".join(f"{k}={sw.format_value(overrides.get(k))}" for k in swept)


def _job(workdir: str, module_name: str, i: int) -> tuple[int, str, list[str]]:
    """Trial i as a `run_trials` job: the experiment's own command line on the trial's config file."""
    d = sw.trial_dir(workdir, i)
    return i, d, [sys.executable, "-m", module_name, "--workdir", d, "--config", os.path.join(d, "config.py")]


def run_local(workdir, module_name, trials, todo, swept, sweep, parallel):
    """Each trial a process of `python -m MODULE`, `parallel` at a time."""
    jobs = []
    for i in todo:
        jobs.append(_job(workdir, module_name, i))
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if parallel > 1 else {}  # trials share an accelerator
    done = [0]

    def on_finish(i, info):
        done[0] += 1
        what = info["status"] if info["status"] != "failed" else f"FAILED: {info.get('error')}"
        metric = sw.read_json(os.path.join(sw.trial_dir(workdir, i), "summary.json"), {}).get(sweep.metric)
        value = f" {sweep.metric} {sw.format_value(metric)}" if metric is not None and info["status"] == "done" else ""
        print(f"[{done[0]}/{len(jobs)}] {_describe(i, trials[i], swept)}: {what}{value} ({info['seconds']:.0f} s)")
        sys.stdout.flush()
        sw.write_results(workdir, sweep, trials)

    for i, d, _ in jobs:
        print(f"queued {_describe(i, trials[i], swept)} (log: {os.path.join(d, 'log.txt')})")
    sys.stdout.flush()
    sw.run_trials(jobs, parallel=parallel, env=env, on_finish=on_finish)


def run_vectorized(workdir, module, base, variant, trials, todo, swept):
    """All unfinished trials in this process, stacked (those another sweep process holds are left to it)."""
    from seqjax.training.vectorized import check_vectorizable, train_and_evaluate_many

    if "workdir" in inspect.signature(module.TASK).parameters:
        raise SystemExit(f"{module.__name__} trains stages of its own; it cannot be vectorised (run without it)")
    configs = {i: sw.trial_config(base, variant, trials[i]) for i in todo}
    try:
        check_vectorizable(list(configs.values()), module.TASK)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    with contextlib.ExitStack() as locks:
        mine = []
        for i in todo:
            d = sw.trial_dir(workdir, i)
            if locks.enter_context(sw.trial_lock(d)) and sw.trial_status(d) != "done":
                locks.enter_context(workdir_lock(d))  # as its own run would: no other run writes there meanwhile
                mine.append(i)
            else:
                print(f"trial_{i:03d}: another sweep process has it; skipped")
        if not mine:
            return
        dirs = [sw.trial_dir(workdir, i) for i in mine]
        print(
            f"training {len(mine)} trials stacked in one program: "
            + ", ".join(_describe(i, trials[i], swept) for i in mine)
        )
        sys.stdout.flush()
        tasks = [module.TASK(configs[i]) for i in mine]
        started = time.time()
        for d in dirs:
            info = sw.read_json(os.path.join(d, "trial.json"), {})
            sw.update_trial(d, status="running", attempts=info.get("attempts", 0) + 1, error=None, vectorized=True)
        try:
            summaries = train_and_evaluate_many([configs[i] for i in mine], dirs, tasks)
        except (Exception, KeyboardInterrupt, SystemExit) as e:
            for d in dirs:
                sw.update_trial(d, status="pending")
            if isinstance(e, SystemExit) and not e.code:  # Ctrl-C or SIGTERM: every trial saved a checkpoint
                raise KeyboardInterrupt from None
            raise
        seconds = round(time.time() - started, 2)
        for d, s in zip(dirs, summaries, strict=True):
            if "error" in s:
                sw.update_trial(d, status="failed", error=s["error"], seconds=seconds)
            else:
                sw.update_trial(d, status="done", error=None, seconds=seconds)


def run_optuna(workdir, module_name, trials, todo, sweep, storage, study_name):
    """A worker of a sweep shared through an Optuna study (see the module docstring)."""
    try:
        import optuna
    except ImportError:
        raise SystemExit("--engine optuna needs Optuna: pip install 'seqjax[sweep]' (or pip install optuna)") from None
    from optuna.storages import RDBStorage, RetryFailedTrialCallback
    from optuna.trial import TrialState

    if not storage:
        raise SystemExit("--engine optuna needs --storage (a database URL all workers reach, e.g. sqlite:///F.db)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(10):  # workers started together race to create the database's tables
        try:
            rdb = RDBStorage(
                storage,
                heartbeat_interval=30,
                grace_period=120,
                failed_trial_callback=RetryFailedTrialCallback(max_retry=3),
            )
            direction = "minimize" if sweep.mode == "min" else "maximize"
            study = optuna.create_study(storage=rdb, study_name=study_name, direction=direction, load_if_exists=True)
            break
        except Exception:  # sqlalchemy's IntegrityError / OperationalError while another worker creates them
            if attempt == 9:
                raise
            time.sleep(0.5 + random.random())
    with open(os.path.join(workdir, ".enqueue.lock"), "w") as lock:  # one worker at a time enqueues
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Trials whose worker died (no heartbeat for the grace period) fail now, and RetryFailedTrialCallback
        # enqueues them again (they resume from their checkpoints).
        optuna.storages.fail_stale_trials(study)
        states = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        active = {t.user_attrs.get("seqjax_trial") for t in study.get_trials(deepcopy=False, states=states)}
        for i in todo:
            if i not in active:
                study.enqueue_trial({"trial_index": i}, user_attrs={"seqjax_trial": i})
    n = len(trials)

    def objective(trial):
        if trial.user_attrs.get("seqjax_trial") is None:  # the queue ran dry: nothing of ours to run
            study.stop()
            raise optuna.TrialPruned("no waiting trial left")
        i = trial.suggest_int("trial_index", 0, n - 1)
        d = sw.trial_dir(workdir, i)
        if sw.trial_status(d) == "done":  # enqueued twice (workers on machines that raced): nothing to run
            raise optuna.TrialPruned(f"trial_{i:03d} is already done")
        info = sw.run_trials([_job(workdir, module_name, i)]).get(i)
        if info is None:
            raise optuna.TrialPruned(f"trial_{i:03d} is being run by another process")
        print(f"{_describe(i, trials[i], sweep.swept_keys())}: {info['status']} ({info['seconds']:.0f} s)", flush=True)
        if info["status"] != "done":
            raise RuntimeError(f"trial_{i:03d} failed: {info.get('error')}")
        return _metric(i)

    def _metric(i):
        value = sw.trial_row(workdir, i, trials[i]).get(sweep.metric)
        if value is None:
            raise RuntimeError(f"trial_{i:03d} has no {sweep.metric!r} in summary.json or metrics.jsonl")
        return float(value)

    def stop_when_empty(study, _):
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.stop()

    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.optimize(objective, catch=(RuntimeError,), callbacks=[stop_when_empty])


def main(argv):
    """Runs the sweep; a bad config of a trial (or a workdir in use) is one line, `error: config.KEY: ...`, and
    exit status 2 (see `experiments._common.exit_with_error`)."""
    from experiments._common import exit_with_error

    try:
        run_sweep(argv)
    except ConfigError as e:
        exit_with_error(e)


def run_sweep(argv):
    del argv
    from absl import logging

    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    for name in ("experiment", "workdir", "sweep"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    module = experiment_module(FLAGS.experiment)
    base, variant = split_config(FLAGS.config) if FLAGS.config else (default_config_path(module), None)
    sweep = sw.load_sweep(FLAGS.sweep)
    workdir = os.path.abspath(FLAGS.workdir)
    swept = sweep.swept_keys()
    if FLAGS.dry_run:
        for i, t in enumerate(sweep.trials()):
            print(f"{sw.trial_dir(workdir, i)}: {t}")
        return
    trials = prepare(workdir, FLAGS.experiment, base, variant, sweep, FLAGS.sweep)
    todo = [i for i in range(len(trials)) if sw.trial_status(sw.trial_dir(workdir, i)) != "done"]
    skipped = len(trials) - len(todo)
    print(
        f"sweep of {len(trials)} trials over {swept or 'nothing'} in {workdir}: {skipped} finished, {len(todo)} to run"
    )
    sys.stdout.flush()
    try:
        if todo and FLAGS.engine == "optuna":
            # The default name ties the study to these trials: another sweep in the same database gets its own.
            digest = hashlib.sha1(json.dumps(trials, sort_keys=True, default=str).encode()).hexdigest()[:8]
            study = FLAGS.study or f"{os.path.basename(workdir.rstrip('/'))}-{digest}"
            print(f"Optuna study {study!r} in {FLAGS.storage}")
            run_optuna(workdir, module.__name__, trials, todo, sweep, FLAGS.storage, study)
        elif todo and FLAGS.vectorize:
            run_vectorized(workdir, module, base, variant, trials, todo, swept)
        elif todo:
            run_local(workdir, module.__name__, trials, todo, swept, sweep, FLAGS.parallel)
    except KeyboardInterrupt:
        sw.write_results(workdir, sweep, trials)
        print(f"\ninterrupted: running trials saved a checkpoint; rerun the same command to finish ({workdir})")
        sys.exit(130)
    rows = sw.write_results(workdir, sweep, trials)
    print(open(os.path.join(workdir, "results.md")).read())
    failed = [r for r in rows if r["status"] == "failed"]
    pending = [r for r in rows if r["status"] == "pending"]
    if pending:
        print(f"{len(pending)} trial(s) not finished by this process (another sweep process or worker has them).")
    if failed:
        print(f"{len(failed)} trial(s) failed; see their log.txt. Rerun the same command to try them again.")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
