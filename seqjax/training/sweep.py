"""Hyperparameter sweeps: what a sweep file says, the trials it expands to, running them, and their results.

A sweep file is Python, like a config file, with `get_sweep()` returning a `Sweep`:

    from seqjax.training import sweep

    def get_sweep():
        return sweep.Sweep(
            sweep.product(sweep.grid("learning_rate", [1e-3, 3e-3]), sweep.grid("num_layers", [1, 2])),
            metric="eval_loss", mode="min",
            fixed={"num_train_steps": 600},          # the same in every trial
        )

Spaces: `grid(key, values)` (or `grid({key: values, ...})`, their product), `product(*spaces)` (the last varies
fastest), `zip(*spaces)` (equal lengths, side by side), `chain(*spaces)` (one after the other), `trials([{...},
...])` (a list of overrides), and `random({key: distribution}, num_trials, seed)` with `uniform(a, b)`,
`log_uniform(a, b)`, `int_uniform(a, b)` (inclusive) and `choice(values)`: the same seed draws the same trials.
Keys are config keys, dotted for nested fields ("vqvae.num_codes").

Trial i runs in DIR/trial_{i:03d} (`trial_dir`), with the state of the whole sweep in DIR/sweep.json and of each
trial in its trial.json (status pending / running / done / failed, the error, the seconds it took). `run_trials`
runs commands N at a time and records what each did; `collect` and `write_results` make DIR/results.csv,
DIR/results.md (sorted by the metric), DIR/metric_vs_KEY.png for each swept key and DIR/curves.png (the loss curves
of all trials).
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import ctypes
import difflib
import fcntl
import importlib.util
import itertools
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seqjax.errors import ConfigError

# -- what a sweep file says ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Space:
    """A list of trials, each a dict of config overrides. Every constructor below expands at once, so a space is
    just its trials (and a bad one fails where it is written)."""

    items: tuple

    def expand(self) -> list[dict[str, Any]]:
        return [dict(t) for t in self.items]


def _space(overrides: Sequence[dict[str, Any]]) -> Space:
    return Space(tuple(dict(t) for t in overrides))


def trials(overrides: Sequence[dict[str, Any]]) -> Space:
    """Exactly these trials."""
    if not all(isinstance(t, dict) for t in overrides):
        raise ValueError("sweep.trials takes a list of dicts of config overrides")
    return _space(overrides)


def grid(key: str | dict[str, Sequence], values: Sequence | None = None) -> Space:
    """One key over `values`; or, given a dict {key: values}, the product of those grids in the dict's order."""
    if isinstance(key, dict):
        if values is not None:
            raise ValueError("sweep.grid({key: values, ...}) takes no second argument")
        return product(*(grid(k, v) for k, v in key.items()))
    if values is None or isinstance(values, (str, bytes)) or not len(values):
        raise ValueError(f"sweep.grid({key!r}, values): values must be a non-empty list, got {values!r}")
    return _space({key: v} for v in values)


def product(*spaces: Space) -> Space:
    """Every combination (the last space varies fastest)."""
    out = [{}]
    for space in spaces:
        out = [{**a, **b} for a in out for b in space.items]
    return _space(out)


def zip(*spaces: Space) -> Space:
    """Trial i of each space, merged."""
    if len({len(s.items) for s in spaces}) > 1:
        raise ValueError(f"sweep.zip needs spaces of equal length, got {[len(s.items) for s in spaces]}")
    rows = builtins.zip(*(s.items for s in spaces), strict=True)
    return _space(dict(itertools.chain.from_iterable(d.items() for d in ds)) for ds in rows)


def chain(*spaces: Space) -> Space:
    """The trials of each space, one after the other."""
    return _space(t for s in spaces for t in s.items)


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "uniform":
            return float(rng.uniform(*self.args))
        if self.kind == "log_uniform":
            lo, hi = self.args
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if self.kind == "int_uniform":
            return int(rng.integers(self.args[0], self.args[1] + 1))
        values = self.args[0]
        return values[int(rng.integers(len(values)))]


def uniform(low: float, high: float) -> Distribution:
    if not low < high:
        raise ValueError(f"sweep.uniform needs low < high, got {low}, {high}")
    return Distribution("uniform", (low, high))


def log_uniform(low: float, high: float) -> Distribution:
    """exp(uniform(log low, log high)): as likely in [1e-4, 1e-3] as in [1e-3, 1e-2]."""
    if not 0 < low < high:
        raise ValueError(f"sweep.log_uniform needs 0 < low < high, got {low}, {high}")
    return Distribution("log_uniform", (low, high))


def int_uniform(low: int, high: int) -> Distribution:
    """An integer in [low, high], both included."""
    if not low <= high:
        raise ValueError(f"sweep.int_uniform needs low <= high, got {low}, {high}")
    return Distribution("int_uniform", (int(low), int(high)))


def choice(values: Sequence) -> Distribution:
    if not len(values):
        raise ValueError("sweep.choice needs at least one value")
    return Distribution("choice", (tuple(values),))


def random(distributions: dict[str, Distribution], num_trials: int, seed: int = 0) -> Space:
    """`num_trials` independent draws of every key (in the dict's order) from a generator seeded with `seed`."""
    if num_trials < 1:
        raise ValueError(f"sweep.random needs num_trials >= 1, got {num_trials}")
    for k, d in distributions.items():
        if not isinstance(d, Distribution):
            raise ValueError(f"sweep.random: {k!r} must be uniform / log_uniform / int_uniform / choice, got {d!r}")
    rng = np.random.default_rng(int(seed))
    return _space({k: d.draw(rng) for k, d in distributions.items()} for _ in range(int(num_trials)))


@dataclass
class Sweep:
    """The space, the metric that ranks trials (a key of summary.json or of the last metrics.jsonl row, e.g.
    "eval_loss") and its direction, and overrides every trial shares."""

    space: Space
    metric: str = "eval_loss"
    mode: str = "min"
    fixed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"Sweep mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.space, Space):
            raise ValueError(f"Sweep's first argument must be a space (grid, product, ...), got {self.space!r}")

    def trials(self) -> list[dict[str, Any]]:
        """Each trial's overrides: the fixed ones, then the trial's own (numpy scalars as Python numbers)."""
        out = [{k: _plain(v) for k, v in {**self.fixed, **t}.items()} for t in self.space.expand()]
        if not out:
            raise ValueError("the sweep has no trials")
        return out

    def swept_keys(self) -> list[str]:
        """The keys whose values differ between trials, in the order they first appear."""
        ts = self.trials()
        keys = list(dict.fromkeys(k for t in ts for k in t))
        return [k for k in keys if len({json.dumps(t.get(k), sort_keys=True, default=str) for t in ts}) > 1]


def _plain(value: Any) -> Any:
    """numpy scalars (np.logspace(...) values) and arrays as Python values, so they can be written and compared."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def load_sweep(path: str) -> Sweep:
    """The `Sweep` from a sweep file's `get_sweep()`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no sweep file {path}")
    spec = importlib.util.spec_from_file_location("seqjax_sweep_file", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} must define get_sweep() returning seqjax.training.sweep.Sweep")
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path}: get_sweep() must return a seqjax.training.sweep.Sweep, got {type(sweep).__name__}")
    return sweep


# -- configs of trials ---------------------------------------------------------------------------------------------


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """`config` (an ml_collections.ConfigDict, changed in place) with dotted keys set; unknown keys and values of the
    wrong type raise `ConfigError` naming the key."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for depth, name in enumerate([*parents, leaf]):
            if not hasattr(node, "keys") or name not in node:
                near = difflib.get_close_matches(name, list(node.keys()) if hasattr(node, "keys") else [], n=1)
                hint = f"did you mean {'.'.join([*parents[:depth], near[0]])}?" if near else "only keys the config has"
                raise ConfigError(key, f"no such key in the config ({hint})")
            if depth < len(parents):
                node = node[name]
        try:
            node[leaf] = value
        except TypeError:
            kind = type(node[leaf]).__name__
            raise ConfigError(key, f"{value!r} has the wrong type ({kind}, like {node[leaf]!r})") from None
    return config


def load_config(path: str, variant: str | None = None) -> Any:
    """`get_config()` (or `get_config(variant)`) of a config file."""
    spec = importlib.util.spec_from_file_location("seqjax_config_file", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if variant is None else module.get_config(variant)


def trial_config(base: str, variant: str | None, overrides: dict[str, Any]) -> Any:
    """A trial's config: the base config file's, with the trial's overrides. (Trial config files call this.)"""
    return apply_overrides(load_config(base, variant), overrides)


def trial_dir(sweep_dir: str, index: int) -> str:
    return os.path.join(sweep_dir, f"trial_{index:03d}")


def write_trial_config(directory: str, base: str, variant: str | None, overrides: dict[str, Any], note: str) -> str:
    """DIR/config.py: a config file (for `--config`) that is the base config with these overrides."""
    path = os.path.join(directory, "config.py")
    text = (
        f'"""{note}"""\n\n'
        "from seqjax.training.sweep import trial_config\n\n"
        f"BASE = {os.path.abspath(base)!r}\n"
        f"VARIANT = {variant!r}\n"
        f"OVERRIDES = {overrides!r}\n\n\n"
        "def get_config(arg=None):\n"
        "    return trial_config(BASE, VARIANT, OVERRIDES)\n"
    )
    _write_atomic(path, text)
    return path


def _write_atomic(path: str, text: str) -> None:
    """Readers see the old file or the new one, never a part (workers on several machines may write it)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: str, value: Any) -> None:
    _write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def trial_status(directory: str) -> str:
    """ "done" (finished: summary.json written after the last start), "failed", or "pending" (never started, or
    stopped before the end: it resumes from its checkpoint)."""
    info = read_json(os.path.join(directory, "trial.json"), {})
    status = info.get("status", "pending")
    if status == "done" and not os.path.exists(os.path.join(directory, "summary.json")):
        return "pending"
    return status if status in ("done", "failed") else "pending"


def update_trial(directory: str, **fields: Any) -> dict:
    path = os.path.join(directory, "trial.json")
    info = {**read_json(path, {}), **fields}
    write_json(path, info)
    return info


@contextlib.contextmanager
def trial_lock(directory: str):
    """Holds DIR/.trial.lock (an exclusive flock) while a trial runs, so two sweep processes sharing a directory
    never run the same trial at once; yields False (and holds nothing) when another process has it. (The trial's own
    run holds DIR/.lock, `seqjax.training.workdir`, while it writes there.)"""
    fd = os.open(os.path.join(directory, ".trial.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- running trials ------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: SIGTERM when the sweep process dies (even by SIGKILL), so no trial outlives its sweep; the
    loop turns SIGTERM into a checkpoint and a clean exit."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: children may outlive a killed sweep
        pass


def _last_error(log_path: str) -> str:
    """The exception line of a trial's log (the last line that looks like one), or its last line."""
    try:
        lines = [x.rstrip() for x in open(log_path, errors="replace").read().splitlines() if x.strip()]
    except FileNotFoundError:
        return "no log"
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head in ("FloatingPointError", "AssertionError"):
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def run_trials(
    jobs: list[tuple[int, str, list[str]]],
    parallel: int = 1,
    env: dict[str, str] | None = None,
    on_finish: Callable[[int, dict], None] | None = None,
    poll: float = 0.2,
) -> dict[int, dict]:
    """Runs `(index, directory, command)` jobs, at most `parallel` at once, each with stdout and stderr appended to
    DIRECTORY/log.txt and its state in DIRECTORY/trial.json. A job that exits non-zero, or without writing
    summary.json, is "failed" with the error line of its log; the others go on. Jobs whose lock another process
    holds are skipped. Ctrl-C (or SIGTERM) stops the running trials (each saves a checkpoint) and raises
    KeyboardInterrupt. Returns {index: trial.json}."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    queue = list(jobs)
    running: dict[int, tuple[subprocess.Popen, Any, Any, str, float]] = {}
    results: dict[int, dict] = {}
    child_env = {**os.environ, **(env or {})}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        while queue or running:
            while queue and len(running) < parallel:
                index, directory, command = queue.pop(0)
                lock = trial_lock(directory)
                if not lock.__enter__():
                    print(f"trial_{index:03d}: another sweep process is running it; skipped", flush=True)
                    continue
                if trial_status(directory) == "done":  # another process finished it meanwhile
                    lock.__exit__(None, None, None)
                    continue
                attempts = read_json(os.path.join(directory, "trial.json"), {}).get("attempts", 0) + 1
                update_trial(directory, status="running", attempts=attempts, error=None, pid=os.getpid())
                log = open(os.path.join(directory, "log.txt"), "a")
                log.write(f"\n=== attempt {attempts}: {' '.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(  # its own session: Ctrl-C reaches the sweep, which stops it with SIGTERM
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    preexec_fn=_die_with_parent,
                    start_new_session=True,
                )
                running[index] = (proc, log, lock, directory, time.time())
            for index in list(running):
                proc, log, lock, directory, started = running[index]
                if proc.poll() is None:
                    continue
                log.close()
                seconds = time.time() - started
                ok = proc.returncode == 0 and os.path.exists(os.path.join(directory, "summary.json"))
                if ok:
                    info = update_trial(directory, status="done", returncode=0, seconds=round(seconds, 2), error=None)
                elif proc.returncode == 0:  # stopped before the end without an error (a SIGTERM from elsewhere)
                    error = "exited 0 before writing summary.json (stopped by SIGTERM?); rerun to resume it"
                    info = update_trial(
                        directory, status="failed", returncode=0, seconds=round(seconds, 2), error=error
                    )
                else:
                    error = _last_error(os.path.join(directory, "log.txt"))
                    info = update_trial(
                        directory, status="failed", returncode=proc.returncode, seconds=round(seconds, 2), error=error
                    )
                lock.__exit__(None, None, None)
                del running[index]
                results[index] = info
                if on_finish is not None:
                    on_finish(index, info)
            if running:
                time.sleep(poll)
    except KeyboardInterrupt:
        for proc, *_ in running.values():
            proc.send_signal(signal.SIGTERM)  # each saves a checkpoint at its next step and exits
        for proc, log, lock, directory, _ in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            update_trial(directory, status="pending")
            lock.__exit__(None, None, None)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- results -------------------------------------------------------------------------------------------------------


def _last_metrics(directory: str) -> dict[str, Any]:
    from seqjax.training.loop import read_metrics

    rows = read_metrics(directory)
    out: dict[str, Any] = {}
    for row in rows.values():  # the latest value of every metric
        out.update(row)
    return out


def trial_row(sweep_dir: str, index: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Trial `index`'s row: index, status, the overrides, the last logged metrics, the summary, seconds, error."""
    d = trial_dir(sweep_dir, index)
    info = read_json(os.path.join(d, "trial.json"), {})
    status = trial_status(d) if os.path.isdir(d) else "pending"
    row: dict[str, Any] = {"trial": index, "status": status, **overrides}
    metrics = {k: v for k, v in _last_metrics(d).items() if k not in ("steps_per_sec",)}
    row.update({k: v for k, v in metrics.items() if k not in overrides})
    summary = read_json(os.path.join(d, "summary.json"), {}) if status == "done" else {}
    row.update({k: v for k, v in summary.items() if k not in overrides and not isinstance(v, (dict, list))})
    row["seconds"] = info.get("seconds")
    row["error"] = info.get("error") if status == "failed" else None
    return row


def collect(sweep_dir: str, trials_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial (`trial_row`)."""
    return [trial_row(sweep_dir, i, overrides) for i, overrides in enumerate(trials_)]


def rank(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Finished trials with the metric first, best first; then the rest in trial order."""

    def key(row):
        v = row.get(metric)
        good = row["status"] == "done" and isinstance(v, (int, float)) and math.isfinite(v)
        return (0, v if mode == "min" else -v, row["trial"]) if good else (1, 0, row["trial"])

    return sorted(rows, key=key)


def format_value(v: Any) -> str:
    """A cell of the results table: floats to 4 significant digits, None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(sweep_dir: str, sweep: Sweep, trials_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DIR/results.csv (every column), DIR/results.md (sorted by the metric), and the plots; returns the ranked
    rows."""
    rows = rank(collect(sweep_dir, trials_), sweep.metric, sweep.mode)
    swept = sweep.swept_keys()
    columns = list(dict.fromkeys(["trial", "status", *swept, sweep.metric]))
    extra = sorted({k for r in rows for k in r} - set(columns) - {"seconds", "error"})
    columns += [*extra, "seconds", "error"]
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: r["trial"]):
            writer.writerow({k: r.get(k) for k in columns})
    short = list(dict.fromkeys(["trial", *swept, sweep.metric, "status", "seconds", "error"]))
    done = sum(r["status"] == "done" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    lines = [
        f"# Sweep results: {sweep.metric} ({sweep.mode}), best first",
        "",
        f"{len(rows)} trials: {done} done, {failed} failed, {len(rows) - done - failed} pending. "
        "Every column is in results.csv.",
        "",
        "| " + " | ".join(short) + " |",
        "|" + "---|" * len(short),
    ]
    for r in rows:
        cells = [format_value(r.get(k)) for k in short]
        cells[0] = f"trial_{r['trial']:03d}"
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    _write_atomic(os.path.join(sweep_dir, "results.md"), "\n".join(lines) + "\n")
    plot_results(sweep_dir, rows, swept, sweep.metric)
    return rows


def plot_results(sweep_dir: str, rows: list[dict[str, Any]], swept: list[str], metric: str) -> list[str]:
    """metric_vs_KEY.png for each swept key (finished trials; log x for positive keys spanning over 10x) and
    curves.png (every trial's train loss against step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    done = [r for r in rows if r["status"] == "done" and isinstance(r.get(metric), (int, float))]
    for key in swept:
        pts = [(r[key], r[metric]) for r in done if r.get(key) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(4.8, 3.4))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            if min(xs) > 0 and max(xs) / min(xs) >= 5:  # learning rates and the like
                ax.set_xscale("log")
        else:  # categorical: one column per value
            labels = sorted({str(x) for x in xs})
            ax.set_xticks(range(len(labels)), labels)
            xs = [labels.index(str(x)) for x in xs]
        ax.scatter(xs, ys, alpha=0.7, label="trials")
        ax.scatter([xs[0]], [ys[0]], marker="*", s=160, color="tab:red", label="best")  # rows come ranked
        ax.legend(fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {key}")
        fig.tight_layout()
        path = os.path.join(sweep_dir, f"metric_vs_{key.replace('.', '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    from seqjax.training.loop import read_metrics

    fig, ax = plt.subplots(figsize=(6, 3.8))
    any_curve, positive = False, True
    for r in sorted(rows, key=lambda r: r["trial"]):
        m = read_metrics(trial_dir(sweep_dir, r["trial"]))
        steps = [s for s, row in m.items() if "train_loss" in row and math.isfinite(row["train_loss"])]
        if not steps:
            continue
        losses = [m[s]["train_loss"] for s in steps]
        positive = positive and min(losses) > 0
        label = ", ".join(f"{k}={format_value(r.get(k))}" for k in swept) or f"trial {r['trial']}"
        ax.plot(steps, losses, label=label, lw=1)
        any_curve = True
    if any_curve:
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        if positive:
            ax.set_yscale("log")
        if len(rows) <= 12:
            ax.legend(fontsize=7)
        ax.set_title("train loss of every trial")
        fig.tight_layout()
        path = os.path.join(sweep_dir, "curves.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    plt.close(fig)
    return paths


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
    "product",
    "random",
    "rank",
    "run_trials",
    "trial_config",
    "trial_dir",
    "trial_row",
    "trial_status",
    "trials",
    "uniform",
    "write_results",
    "zip",
]
