"""The trial runner: commands as processes, N at a time, each in its trial directory.

`run_trials` starts each job as a child process (its own session, stdout and stderr appended to log.txt), records
what it did in trial.json, and never runs a trial that another sweep process holds (`trial.trial_lock`). Children
get SIGTERM when the sweep process dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG), and the training loop turns
SIGTERM into a checkpoint and a clean exit; Ctrl-C or SIGTERM to the sweep stops the running trials the same way.
A failed trial is tried again by the next run of the sweep (its attempts are counted).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from seqjax.sweeps.trial import read_json, trial_lock, trial_status, update_trial


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
    return threading.current_thread() is threading.main_thread()


__all__ = ["run_trials"]
