"""The toy run of `toy_task.py` with faults injected, for tests/training/test_fault_injection.py:

python tests/training/fault_child.py WORKDIR [key=value ...]

Environment (read by this script only):
  FAULT_LAYOUT=arrays         checkpoints in Orbax's array format (`Checkpointer(single_file_bytes=0)`) instead of
                              the single-file layout the toy state gets by default.
  FAULT_KILL_AFTER_BYTES=K    SIGKILL this process part-way through a checkpoint write: once K bytes in all have been
                              written to files under WORKDIR/checkpoints, the write that crosses K writes only its
                              part up to K, flushes it to the OS and the process kills itself.
  FAULT_LOG=PATH              where the kill is recorded (file, bytes written to it) just before it happens.

The hook wraps Python's `open` (builtins and io, installed before anything else is imported), so it sees every
file that Python code writes into the checkpoint directory whatever module writes it: seqjax's single-file writer
(state.bin, index.json) and Orbax's metadata files (its array data is written by TensorStore, in C++, which this hook
does not see; a kill in Orbax's layout lands in the metadata written around the arrays, before the step's temporary
directory is renamed into place).
"""

import builtins
import io
import json
import os
import runpy
import signal
import sys

WORKDIR = os.path.abspath(sys.argv[1])
LIMIT = int(os.environ.get("FAULT_KILL_AFTER_BYTES", "-1"))
_written = [0]
_open = builtins.open


class _Killing:
    """A file object whose writes count towards LIMIT; the one that crosses it is cut there and the process dies."""

    def __init__(self, f, path):
        self._f, self._path = f, path

    def write(self, data):
        room = LIMIT - _written[0]
        if len(data) < room:
            _written[0] += len(data)
            return self._f.write(data)
        self._f.write(data[:room])
        self._f.flush()
        with _open(os.environ["FAULT_LOG"], "w") as log:
            json.dump({"file": self._path, "bytes_into_file": self._f.tell(), "bytes_total": LIMIT}, log)
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def _killing_open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    path = os.path.abspath(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else ""
    if any(c in mode for c in "wax+") and path.startswith(os.path.join(WORKDIR, "checkpoints") + os.sep):
        return _Killing(f, path)
    return f


if LIMIT >= 0:
    builtins.open = io.open = _killing_open

if os.environ.get("FAULT_LAYOUT") == "arrays":
    import seqjax.training.loop as loop

    class ArrayFormat(loop.Checkpointer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, single_file_bytes=0)

    loop.Checkpointer = ArrayFormat

sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_task.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
