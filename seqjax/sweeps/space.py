"""The sweep language: what a sweep file says.

A sweep file is Python, like a config file, with `get_sweep()` returning a `Sweep`:

    from seqjax import sweeps

    def get_sweep():
        return sweeps.Sweep(
            sweeps.product(sweeps.grid("learning_rate", [1e-3, 3e-3]), sweeps.grid("num_layers", [1, 2])),
            metric="eval_loss", mode="min",
            fixed={"num_train_steps": 600},          # the same in every trial
        )

Spaces: `grid(key, values)` (or `grid({key: values, ...})`, their product), `product(*spaces)` (the last varies
fastest), `zip(*spaces)` (equal lengths, side by side), `chain(*spaces)` (one after the other), `trials([{...},
...])` (a list of overrides), and `random({key: distribution}, num_trials, seed)` with `uniform(a, b)`,
`log_uniform(a, b)`, `int_uniform(a, b)` (inclusive) and `choice(values)`: the same seed draws the same trials.
Keys are config keys, dotted for nested fields ("vqvae.num_codes").
"""

from __future__ import annotations

import builtins
import importlib.util
import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
        raise ValueError("sweeps.trials takes a list of dicts of config overrides")
    return _space(overrides)


def grid(key: str | dict[str, Sequence], values: Sequence | None = None) -> Space:
    """One key over `values`; or, given a dict {key: values}, the product of those grids in the dict's order."""
    if isinstance(key, dict):
        if values is not None:
            raise ValueError("sweeps.grid({key: values, ...}) takes no second argument")
        return product(*(grid(k, v) for k, v in key.items()))
    if values is None or isinstance(values, (str, bytes)) or not len(values):
        raise ValueError(f"sweeps.grid({key!r}, values): values must be a non-empty list, got {values!r}")
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
        raise ValueError(f"sweeps.zip needs spaces of equal length, got {[len(s.items) for s in spaces]}")
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
        raise ValueError(f"sweeps.uniform needs low < high, got {low}, {high}")
    return Distribution("uniform", (low, high))


def log_uniform(low: float, high: float) -> Distribution:
    """exp(uniform(log low, log high)): as likely in [1e-4, 1e-3] as in [1e-3, 1e-2]."""
    if not 0 < low < high:
        raise ValueError(f"sweeps.log_uniform needs 0 < low < high, got {low}, {high}")
    return Distribution("log_uniform", (low, high))


def int_uniform(low: int, high: int) -> Distribution:
    """An integer in [low, high], both included."""
    if not low <= high:
        raise ValueError(f"sweeps.int_uniform needs low <= high, got {low}, {high}")
    return Distribution("int_uniform", (int(low), int(high)))


def choice(values: Sequence) -> Distribution:
    if not len(values):
        raise ValueError("sweeps.choice needs at least one value")
    return Distribution("choice", (tuple(values),))


def random(distributions: dict[str, Distribution], num_trials: int, seed: int = 0) -> Space:
    """`num_trials` independent draws of every key (in the dict's order) from a generator seeded with `seed`."""
    if num_trials < 1:
        raise ValueError(f"sweeps.random needs num_trials >= 1, got {num_trials}")
    for k, d in distributions.items():
        if not isinstance(d, Distribution):
            raise ValueError(f"sweeps.random: {k!r} must be uniform / log_uniform / int_uniform / choice, got {d!r}")
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
        raise ValueError(f"{path} must define get_sweep() returning seqjax.sweeps.Sweep")
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path}: get_sweep() must return a seqjax.sweeps.Sweep, got {type(sweep).__name__}")
    return sweep


__all__ = [
    "Distribution",
    "Space",
    "Sweep",
    "chain",
    "choice",
    "grid",
    "int_uniform",
    "load_sweep",
    "log_uniform",
    "product",
    "random",
    "trials",
    "uniform",
    "zip",
]
