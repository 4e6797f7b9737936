"""Fault injection: the toy run is SIGKILLed at a moment drawn from a seed, in either checkpoint layout, then the same
command is run again; the whole loss curve (and the end-of-run summary) must equal an uninterrupted run's, bitwise.

The kill lands either part-way through a checkpoint write (the child kills itself once K bytes in all have gone into
files under WORKDIR/checkpoints, K drawn from the seed: see fault_child.py) or at a random time from outside (after a
drawn step, plus a drawn fraction of a step)."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from seqjax.training.loop import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(ROOT, "tests", "training", "fault_child.py")
STEPS = 40  # checkpoints every 10 steps (toy_config)
# seed: (checkpoint layout, where the kill lands). "file": the single-file layout the toy state gets by default;
# "arrays": Orbax's array format (Checkpointer(single_file_bytes=0)).
CASES = {0: ("file", "write"), 1: ("arrays", "write"), 2: ("file", "time"), 3: ("arrays", "time"), 4: ("file", "write")}
# Bytes written to checkpoint files per save of the toy state (measured: ~8.8 kB single-file, ~7.4 kB arrays, Orbax's
# metadata included): a kill drawn in this range lands in the first three saves of four, mostly after the first.
KILL_BYTES = (8_000, 20_000)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The children share a JAX compilation cache: a rerun loads what the killed run compiled."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


def _start(workdir, *args, **env):
    environ = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env}
    cmd = [sys.executable, CHILD, str(workdir), f"num_train_steps={STEPS}", *args]
    return subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def _curve(workdir):
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    return {s: r["train_loss"] for s, r in read_metrics(str(workdir)).items()}, summary


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    rc, out = _finish(_start(workdir))
    assert rc == 0, out
    return _curve(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("seed", sorted(CASES))
def test_sigkill_at_a_random_moment_then_rerun_is_bitwise_exact(tmp_path, uninterrupted, seed):
    layout, where = CASES[seed]
    rng = random.Random(seed)
    env = {"FAULT_LAYOUT": layout}
    log = tmp_path / "kill.json"
    if where == "write":
        proc = _start(tmp_path, **env, FAULT_KILL_AFTER_BYTES=str(rng.randrange(*KILL_BYTES)), FAULT_LOG=str(log))
        rc, out = _finish(proc)
        assert rc == -signal.SIGKILL, f"the child was not killed inside a checkpoint write (hook missed?)\n{out}"
        killed = json.load(open(log))
        assert killed["file"].startswith(str(tmp_path / "checkpoints") + os.sep), killed
    else:
        proc = _start(tmp_path, "sleep=0.02", **env)  # the pause only widens the window; no number depends on it
        target = rng.randrange(8, STEPS - 5)
        t0 = time.time()
        while not (read_metrics(str(tmp_path)) and max(read_metrics(str(tmp_path))) >= target):
            assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()[0][-3000:]
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    logged = read_metrics(str(tmp_path))
    assert not logged or max(logged) < STEPS  # killed before the end
    finished = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    rc, out = _finish(_start(tmp_path, **env))
    assert rc == 0, out
    resumed = re.search(r"resumed from step (\d+)", out)
    # Resumes from the newest checkpoint that was finished (none: starts afresh), never from a partial one.
    assert (int(resumed.group(1)) if resumed else None) == (finished[-1] if finished else None), (finished, out)
    losses, summary = _curve(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert (losses, summary) == uninterrupted  # every step, bitwise; the final evaluation too
