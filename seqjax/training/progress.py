"""What a training loop shows and what stops it: the progress line of each logged step, and SIGTERM (or Ctrl-C)
turned into a request that the loop reads at step boundaries, where it saves a checkpoint and exits. Shared by the
one loop (`seqjax.training.loop`) and the vectorised one (`seqjax.training.vectorized`).
"""

from __future__ import annotations

import signal
import sys
from typing import Any


def print_progress(row: dict[str, Any], total: int) -> None:
    """A logged row on the console. On a terminal: one line redrawn in place, with a bar; otherwise (logs, pipes)
    a plain line per logged step."""
    parts = [f"step {row['step']:>6d}/{total}"]
    parts += [f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "learning_rate") and isinstance(v, float)]
    line = "  ".join(parts)
    if sys.stdout.isatty():
        done = int(20 * row["step"] / total)
        end = "\n" if row["step"] == total or any(k.startswith("eval_") for k in row) else ""
        print(f"\r[{'#' * done}{'.' * (20 - done)}] {line}\033[K", end=end, flush=True)
    else:
        print(line, flush=True)


class StopRequest:
    """Turns SIGTERM (or the given signals) into a flag, `requested`, that a loop reads at step boundaries; a
    context manager that restores the previous handlers. Outside the main thread it installs nothing."""

    def __init__(self, enabled: bool = True, signals: tuple = (signal.SIGTERM,)):
        self.requested = False
        self.previous: dict = {}
        self.enabled = enabled
        self.signals = signals

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        except ValueError:  # not the main thread: no handler, no graceful stop
            self.previous = {}
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


__all__ = ["StopRequest", "print_progress"]
