"""Hyperparameter sweeps: what a sweep file says, the trials it expands to, running them, and their results.

    space.py    the sweep language: Sweep, grid / product / zip / chain / trials, random with uniform / log_uniform /
                int_uniform / choice; load_sweep (a sweep file's get_sweep())
    trial.py    one trial: trial_dir (DIR/trial_{i:03d}), its config (apply_overrides, moved_key, trial_config,
                write_trial_config), its state (trial.json: trial_status, update_trial), its lock (.trial.lock)
    runner.py   run_trials: commands as processes N at a time (logs, failures, retries, PR_SET_PDEATHSIG, Ctrl-C)
    results.py  trial_row / collect, rank, write_results (results.csv, results.md, metric_vs_KEY.png, curves.png)
    engines.py  run_sweep: prepare the sweep's directory, then local processes or one vectorised program
    study.py    the Optuna engine: workers on several machines sharing a sweep through a study in a database

Importing this package imports neither JAX nor Optuna. `seqjax.training.sweep`, the old home of these names,
remains an alias.
"""

from seqjax.sweeps.engines import prepare, run_sweep
from seqjax.sweeps.results import collect, format_value, rank, trial_row, write_results
from seqjax.sweeps.runner import run_trials
from seqjax.sweeps.space import (
    Distribution,
    Space,
    Sweep,
    chain,
    choice,
    grid,
    int_uniform,
    load_sweep,
    log_uniform,
    product,
    random,
    trials,
    uniform,
    zip,
)
from seqjax.sweeps.trial import (
    apply_overrides,
    load_config,
    moved_key,
    read_json,
    split_config,
    trial_config,
    trial_dir,
    trial_status,
    update_trial,
    write_json,
    write_trial_config,
)

__all__ = [
    "Distribution",
    "Space",
    "Sweep",
    "apply_overrides",
    "chain",
    "choice",
    "collect",
    "format_value",
    "grid",
    "int_uniform",
    "load_config",
    "load_sweep",
    "log_uniform",
    "moved_key",
    "prepare",
    "product",
    "random",
    "rank",
    "read_json",
    "run_sweep",
    "run_trials",
    "split_config",
    "trial_config",
    "trial_dir",
    "trial_row",
    "trial_status",
    "trials",
    "uniform",
    "update_trial",
    "write_json",
    "write_results",
    "write_trial_config",
    "zip",
]
