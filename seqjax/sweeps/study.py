"""The Optuna engine: workers on several machines sharing one sweep through an Optuna study.

Why Optuna: a study in a shared SQL database is a work queue any worker can join with only `pip install optuna` (no
cluster to run, unlike Ray). Every worker runs the same command. Under a file lock in the sweep's directory (which
all workers see), a worker enqueues the sweep file's trials the study does not hold yet (each tagged with its
index), then takes waiting trials through `study.optimize` until none is left, running each exactly as the local
engine does, in WORKDIR/trial_XXX. A worker starting calls `fail_stale_trials` (heartbeat 30 s, grace 120 s), so a
dead worker's trial is enqueued again (`RetryFailedTrialCallback`) and resumes from its checkpoint. The sweep's own
sampling stays ours, so the same sweep file gives the same trials on every engine.
"""

from __future__ import annotations

import fcntl
import os
import random
import time

from seqjax.sweeps.results import describe, trial_row
from seqjax.sweeps.runner import run_trials
from seqjax.sweeps.space import Sweep
from seqjax.sweeps.trial import trial_dir, trial_job, trial_status

HEARTBEAT_SECONDS = 30  # a running trial's worker reports this often
GRACE_SECONDS = 120  # without a report for this long, its trial is failed and enqueued again
MAX_RETRIES = 3


def run_optuna(
    workdir: str, module: str, trials: list[dict], todo: list[int], sweep: Sweep, storage: str | None, study_name: str
) -> None:
    """A worker of a sweep shared through the Optuna study `study_name` in the database `storage` (see the module
    docstring): enqueues the trials in `todo` that the study does not hold yet, then runs waiting trials as
    `python -m MODULE` until none is left."""
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
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                failed_trial_callback=RetryFailedTrialCallback(max_retry=MAX_RETRIES),
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
        d = trial_dir(workdir, i)
        if trial_status(d) == "done":  # enqueued twice (workers on machines that raced): nothing to run
            raise optuna.TrialPruned(f"trial_{i:03d} is already done")
        info = run_trials([trial_job(workdir, module, i)]).get(i)
        if info is None:
            raise optuna.TrialPruned(f"trial_{i:03d} is being run by another process")
        print(f"{describe(i, trials[i], sweep.swept_keys())}: {info['status']} ({info['seconds']:.0f} s)", flush=True)
        if info["status"] != "done":
            raise RuntimeError(f"trial_{i:03d} failed: {info.get('error')}")
        return _metric(i)

    def _metric(i):
        value = trial_row(workdir, i, trials[i]).get(sweep.metric)
        if value is None:
            raise RuntimeError(f"trial_{i:03d} has no {sweep.metric!r} in summary.json or metrics.jsonl")
        return float(value)

    def stop_when_empty(study, _):
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.stop()

    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.optimize(objective, catch=(RuntimeError,), callbacks=[stop_when_empty])


__all__ = ["run_optuna"]
