"""One writer per workdir: `workdir_lock(WORKDIR)` holds an exclusive `fcntl.flock` on WORKDIR/.lock while a run
writes there, so a second run on the same directory stops at once instead of writing its checkpoints and
metrics.jsonl rows next to the first one's.

The lock file holds the holder's PID and host, for the message the second run prints. The kernel drops a flock when
its holder dies, by SIGKILL too, so a stale lock file never blocks a rerun. Within one process the lock is
re-entrant (a count per directory): `train_and_evaluate` takes it (before it builds a task it is given as a function),
and a task that trains stages of its own in sub-directories takes theirs. A job of several JAX processes is one
writer: only process 0 takes it (`enabled=jax.process_index() == 0`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

from seqjax.errors import ConfigError

LOCK_FILE = ".lock"

_held: dict[str, list] = {}  # workdir -> [file descriptor, count] of the locks this process holds
_guard = threading.Lock()


class WorkdirError(ConfigError):
    """The workdir cannot be written, or another run holds it; `str(e)` is `workdir: MESSAGE`."""

    prefix = ""

    def __init__(self, workdir: str, message: str):
        super().__init__("workdir", message)
        self.workdir = workdir

    def __reduce__(self):
        return type(self), (self.workdir, self.message)


def holder(workdir: str) -> dict:
    """{"pid": ..., "host": ...} as the holder wrote them into WORKDIR/.lock ({} when unreadable)."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def acquire(workdir: str) -> str:
    """Takes the lock on `workdir` (created if missing) for this process, or raises `WorkdirError`; returns its
    absolute path. Each call needs one `release`."""
    path = os.path.abspath(workdir)
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return path
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            why = f"cannot write to {path}: {e.strerror} (a directory this user may write)"
            raise WorkdirError(path, why) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = holder(path)
            for _ in range(20):  # the holder writes its name just after taking the lock
                if who:
                    break
                time.sleep(0.05)
                who = holder(path)
            by = f"process {who.get('pid', '?')} on host {who.get('host', '?')}"
            raise WorkdirError(
                path, f"{path} is in use by {by} (one run writes to a workdir at a time: wait for it, or use another)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n", 0)
        _held[path] = [fd, 1]
        return path


def release(workdir: str) -> None:
    """Undoes one `acquire`; the last one unlocks (the file stays, it is reused by the next run)."""
    path = os.path.abspath(workdir)
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])


@contextlib.contextmanager
def workdir_lock(workdir: str, *, enabled: bool = True) -> Iterator[str]:
    """Holds the lock on `workdir` for the block (see the module docstring); yields its absolute path. With
    `enabled=False` (processes other than the first of a multi-process job) it only creates the directory."""
    if not enabled:
        path = os.path.abspath(workdir)
        os.makedirs(path, exist_ok=True)
        yield path
        return
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)


__all__ = ["LOCK_FILE", "WorkdirError", "acquire", "holder", "release", "workdir_lock"]
