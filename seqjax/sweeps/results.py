"""A sweep's results: one row per trial, ranked by the sweep's metric, written as a table and drawn.

`write_results` makes DIR/results.csv (every column, in trial order), DIR/results.md (finished trials best first),
DIR/metric_vs_KEY.png for each swept key and DIR/curves.png (the train loss of every trial).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

from seqjax.sweeps.space import Sweep
from seqjax.sweeps.trial import read_json, trial_dir, trial_status, write_atomic


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


def collect(sweep_dir: str, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial (`trial_row`)."""
    return [trial_row(sweep_dir, i, overrides) for i, overrides in enumerate(trials)]


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


def describe(index: int, overrides: dict[str, Any], swept: list[str]) -> str:
    """`trial_003 learning_rate=0.001 seed=1`: the trial and its values of the swept keys."""
    return f"trial_{index:03d} " + " ".join(f"{k}={format_value(overrides.get(k))}" for k in swept)


def write_results(sweep_dir: str, sweep: Sweep, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DIR/results.csv (every column), DIR/results.md (sorted by the metric), and the plots; returns the ranked
    rows."""
    rows = rank(collect(sweep_dir, trials), sweep.metric, sweep.mode)
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
    write_atomic(os.path.join(sweep_dir, "results.md"), "\n".join(lines) + "\n")
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


__all__ = ["collect", "describe", "format_value", "plot_results", "rank", "trial_row", "write_results"]
