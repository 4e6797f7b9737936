"""sweep: a hyperparameter sweep over any experiment, each trial a run of its own.

    python -m experiments.sweep --experiment seq2seq --workdir runs/sweep_lr --sweep experiments/sweeps/seq2seq_lr.py
        [--config FILE[:VARIANT]] [--parallel N] [--vectorize] [--dry_run]

The sweep file (see `seqjax.sweeps`) gives a grid, a product, a list or random / log-uniform draws over config
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

import importlib
import os
import sys

from absl import app, flags

from seqjax import sweeps
from seqjax.errors import ConfigError
from seqjax.sweeps.engines import ENGINES

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None, "experiment module: a name under experiments/ or a dotted module path")
flags.DEFINE_string("workdir", None, "the sweep's directory (trials go to WORKDIR/trial_XXX)")
flags.DEFINE_string("sweep", None, "sweep file (Python, get_sweep() -> seqjax.sweeps.Sweep)")
flags.DEFINE_string("config", None, "base config FILE[:VARIANT] (default: the experiment's own)")
flags.DEFINE_integer("parallel", 1, "trials run at once (separate processes)")
flags.DEFINE_bool("vectorize", False, "train all unfinished trials as one vmapped program")
flags.DEFINE_bool("dry_run", False, "print the trials and exit")
flags.DEFINE_enum("engine", "local", list(ENGINES), "local processes, or workers sharing an Optuna study")
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
    from experiments.common import CONFIGS

    return module.CONFIG if os.path.isabs(module.CONFIG) else os.path.join(CONFIGS, module.CONFIG)


def main(argv):
    """Runs the sweep; a bad config of a trial (or a workdir in use) is one line, `error: config.KEY: ...`, and
    exit status 2 (see `experiments.common.exit_with_error`)."""
    from experiments.common import exit_with_error

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
    base, variant = sweeps.split_config(FLAGS.config) if FLAGS.config else (default_config_path(module), None)
    sweep = sweeps.load_sweep(FLAGS.sweep)
    workdir = os.path.abspath(FLAGS.workdir)
    if FLAGS.dry_run:
        for i, t in enumerate(sweep.trials()):
            print(f"{sweeps.trial_dir(workdir, i)}: {t}")
        return
    try:
        rows = sweeps.run_sweep(
            workdir,
            FLAGS.experiment,
            module.TASK,
            module.__name__,
            base,
            variant,
            sweep,
            FLAGS.sweep,
            engine=FLAGS.engine,
            parallel=FLAGS.parallel,
            vectorize=FLAGS.vectorize,
            storage=FLAGS.storage,
            study=FLAGS.study,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted: running trials saved a checkpoint; rerun the same command to finish ({workdir})")
        sys.exit(130)
    print(open(os.path.join(workdir, "results.md")).read())
    failed = [r for r in rows if r["status"] == "failed"]
    pending = [r for r in rows if r["status"] == "pending"]
    if pending:
        print(f"{len(pending)} trial(s) not finished by this process (another sweep process or worker has them).")
    if failed:
        print(f"{len(failed)} trial(s) failed; see their log.txt. Rerun the same command to try them again.")
        sys.exit(1)


if __name__ == "__main__":
    from seqjax import runtime

    runtime.restart_with_hugepages_on_cpu()  # as experiments.common.run: CPU hosts only, SEQJAX_HUGEPAGES=0 opts out
    app.run(main)
