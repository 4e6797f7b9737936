"""One trial of a sweep: its directory, its config, its state file and its lock.

Trial i of a sweep in DIR runs in DIR/trial_{i:03d} (`trial_dir`). There `write_trial_config` writes config.py, a
config file (for an experiment's `--config`) that is the base config plus the trial's overrides (`trial_config`),
and trial.json holds the trial's state: status pending / running / done / failed, the error, attempts, the seconds
it took (`trial_status`, `update_trial`). While a sweep process runs the trial it holds DIR/trial_XXX/.trial.lock
(`trial_lock`); the trial's own run holds DIR/trial_XXX/.lock (`seqjax.training.workdir`) while it writes there.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import importlib.util
import json
import os
import sys
import tempfile
from typing import Any

from seqjax.errors import ConfigError


def moved_key(config: Any, key: str) -> str | None:
    """Where a dotted `key` that `config` lacks lives one section down: a part missing from its node that exactly one
    section of that node (a child ConfigDict) holds, e.g. "num_layers" -> "model.num_layers" since the model's fields
    moved into `config.model`; None when there is no such section (or several), or `config` has `key`."""
    parts, node = key.split("."), config
    for depth, name in enumerate(parts):
        if not hasattr(node, "keys"):
            return None
        if name not in node:
            holders = [k for k in node.keys() if hasattr(node[k], "keys") and name in node[k]]
            return ".".join([*parts[:depth], holders[0], *parts[depth:]]) if len(holders) == 1 else None
        node = node[name]
    return None


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """`config` (an ml_collections.ConfigDict, changed in place) with dotted keys set; unknown keys and values of the
    wrong type raise `ConfigError` naming the key (and where it moved, for a key now in a section: `moved_key`)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for depth, name in enumerate([*parents, leaf]):
            if not hasattr(node, "keys") or name not in node:
                moved = moved_key(config, key)
                near = difflib.get_close_matches(name, list(node.keys()) if hasattr(node, "keys") else [], n=1)
                hint = f"did you mean {'.'.join([*parents[:depth], near[0]])}?" if near else "only keys the config has"
                raise ConfigError(key, f"no such key in the config ({f'moved to {moved}' if moved else hint})")
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


def split_config(spec: str) -> tuple[str, str | None]:
    """A config file spec, FILE[:VARIANT] -> (FILE, VARIANT or None)."""
    path, sep, variant = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, variant
    return spec, None


def trial_config(base: str, variant: str | None, overrides: dict[str, Any]) -> Any:
    """A trial's config: the base config file's, with the trial's overrides. (Trial config files call this.)"""
    return apply_overrides(load_config(base, variant), overrides)


def trial_dir(sweep_dir: str, index: int) -> str:
    return os.path.join(sweep_dir, f"trial_{index:03d}")


def trial_job(sweep_dir: str, module: str, index: int) -> tuple[int, str, list[str]]:
    """Trial `index` as a `runner.run_trials` job: `python -m MODULE` (an experiment's command line) on the trial's
    directory and config file."""
    d = trial_dir(sweep_dir, index)
    return index, d, [sys.executable, "-m", module, "--workdir", d, "--config", os.path.join(d, "config.py")]


def write_trial_config(directory: str, base: str, variant: str | None, overrides: dict[str, Any], note: str) -> str:
    """DIR/config.py: a config file (for `--config`) that is the base config with these overrides."""
    path = os.path.join(directory, "config.py")
    text = (
        f'"""{note}"""\n\n'
        "from seqjax.sweeps import trial_config\n\n"
        f"BASE = {os.path.abspath(base)!r}\n"
        f"VARIANT = {variant!r}\n"
        f"OVERRIDES = {overrides!r}\n\n\n"
        "def get_config(arg=None):\n"
        "    return trial_config(BASE, VARIANT, OVERRIDES)\n"
    )
    write_atomic(path, text)
    return path


def write_atomic(path: str, text: str) -> None:
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
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


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


__all__ = [
    "apply_overrides",
    "load_config",
    "read_json",
    "trial_config",
    "trial_dir",
    "trial_job",
    "trial_lock",
    "trial_status",
    "update_trial",
    "write_atomic",
    "write_json",
    "write_trial_config",
]
