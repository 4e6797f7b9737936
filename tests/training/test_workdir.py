"""One writer per workdir (`seqjax.training.workdir`): a second process cannot take a held workdir and is told the
holder's PID and host; the lock goes when its holder dies, by SIGKILL too; within one process it is re-entrant."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from seqjax.errors import ConfigError
from seqjax.training.workdir import WorkdirError, holder, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The module alone, without importing seqjax.training (and JAX): a second process starts in a fraction of a second.
LOAD = (
    "import importlib.util\n"
    f"spec = importlib.util.spec_from_file_location('workdir', {os.path.join(ROOT, 'seqjax/training/workdir.py')!r})\n"
    "workdir = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(workdir)\n"
)


def _try_lock(workdir) -> subprocess.CompletedProcess:
    """Another process tries to take the lock on `workdir`."""
    code = LOAD + textwrap.dedent(f"""
        try:
            with workdir.workdir_lock({str(workdir)!r}):
                print("acquired")
        except workdir.WorkdirError as e:
            print(e)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def _holder_process(workdir) -> subprocess.Popen:
    """A process that takes the lock, says so, and sleeps."""
    code = LOAD + f"import time\nworkdir.acquire({str(workdir)!r})\nprint('held', flush=True)\ntime.sleep(600)\n"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_and_host(tmp_path):
    with workdir_lock(tmp_path / "w") as path:
        assert holder(path) == {"pid": os.getpid(), "host": socket.gethostname()}
        out = _try_lock(tmp_path / "w").stdout
        assert out.startswith("workdir: ") and path in out
        assert f"process {os.getpid()} on host {socket.gethostname()}" in out
    assert _try_lock(tmp_path / "w").stdout.strip() == "acquired"  # released at the end of the block


def test_the_lock_goes_with_its_holder_killed_by_sigkill(tmp_path):
    proc = _holder_process(tmp_path / "w")
    try:
        with pytest.raises(WorkdirError, match=rf"in use by process {proc.pid} on host"):
            with workdir_lock(tmp_path / "w"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with workdir_lock(tmp_path / "w") as path:  # the stale file does not block: the kernel dropped the flock
        assert holder(path)["pid"] == os.getpid()


def test_reentrant_in_one_process_and_released_by_the_outermost(tmp_path):
    with workdir_lock(tmp_path / "w"):
        with workdir_lock(tmp_path / "w"), workdir_lock(tmp_path / "w" / "stage"):  # as dalle's stages do
            assert "in use" in _try_lock(tmp_path / "w").stdout
        assert "in use" in _try_lock(tmp_path / "w").stdout  # the inner release kept it
        assert _try_lock(tmp_path / "w" / "stage").stdout.strip() == "acquired"
    assert _try_lock(tmp_path / "w").stdout.strip() == "acquired"


def test_an_unwritable_workdir_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^workdir: cannot write to .*file/run: Not a directory"):
        with workdir_lock(tmp_path / "file" / "run"):
            pass
    with workdir_lock(tmp_path / "ok", enabled=False):
        assert not (tmp_path / "ok" / ".lock").exists()  # processes other than the first of a job take nothing
