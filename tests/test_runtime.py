"""seqjax.runtime: when the huge-page tunable is added to the environment, and that the experiments' entry points
restart with it (on CPU hosts, first thing in `experiments.common.run`) while importing them does not."""

import importlib.util
import os
import subprocess
import sys

import pytest

from seqjax import runtime
from seqjax.runtime import RESTARTED, TUNABLE, cpu_only, hugepage_environ, hugepage_status, launched_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hugepage_environ_decides_by_libc_version_and_settings():
    env = {"PATH": "/bin"}
    assert hugepage_environ(env, ("glibc", "2.36")) == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE, RESTARTED: "1"}
    assert hugepage_environ(env, ("glibc", "2.35")) is not None
    assert hugepage_environ(env, ("glibc", "2.34")) is None  # the tunable does not exist before 2.35
    assert hugepage_environ(env, ("", "")) is None  # macOS, musl
    assert hugepage_environ(env, ("glibc", "unknown")) is None
    assert hugepage_environ({**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.36")) is None
    assert hugepage_environ({**env, "SEQJAX_HUGEPAGES": "0"}, ("glibc", "2.36")) is None
    assert env == {"PATH": "/bin"}  # not modified


def test_launched_module_reads_the_python_command_line():
    assert launched_module(["python", "-m", "experiments.dalle", "--workdir", "d"]) == "experiments.dalle"
    assert (
        launched_module(["python", "-u", "-X", "importtime", "-W", "ignore", "-m", "experiments.lm"])
        == "experiments.lm"
    )
    assert launched_module(["python", "script.py", "-m", "experiments.lm"]) is None  # -m is the script's argument
    assert launched_module(["python", "-c", "pass", "-m", "experiments.lm"]) is None
    assert launched_module(["python", "-m", "pytest", "-m", "slow"]) == "pytest"
    assert launched_module(["python"]) is None and launched_module(["python", "-m"]) is None


def test_cpu_only_reads_jax_platforms_then_the_installed_plugins(monkeypatch):
    assert cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not cpu_only({"JAX_PLATFORMS": "cuda"}) and not cpu_only({"JAX_PLATFORMS": "cpu,tpu"})
    monkeypatch.setattr(runtime.importlib.metadata, "entry_points", lambda group: ["xla_cuda12"])
    assert not cpu_only({}) and cpu_only({"JAX_PLATFORMS": "cpu"})  # a plugin, but the user asked for the CPU
    monkeypatch.setattr(runtime.importlib.metadata, "entry_points", lambda group: [])
    assert cpu_only({}) == (importlib.util.find_spec("libtpu") is None)


def test_hugepage_status_says_what_happened_and_how_to_change_it():
    restarted = {"GLIBC_TUNABLES": TUNABLE, RESTARTED: "1", "JAX_PLATFORMS": "cpu"}
    assert "on" in hugepage_status(restarted) and "SEQJAX_HUGEPAGES=0" in hugepage_status(restarted)
    assert "set by the caller" in hugepage_status({"GLIBC_TUNABLES": TUNABLE})
    assert hugepage_status({"SEQJAX_HUGEPAGES": "0"}) == "glibc huge pages off (SEQJAX_HUGEPAGES=0)"
    assert "accelerator" in hugepage_status({"JAX_PLATFORMS": "cuda"})


def _probe(tmp_path, **extra):
    """A program that calls the entry points' restart first thing and prints the tunable it then runs with."""
    (tmp_path / "probe.py").write_text(
        "import os\nfrom seqjax import runtime\nruntime.restart_with_hugepages_on_cpu()\n"
        "print(os.environ.get('GLIBC_TUNABLES'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SEQJAX_HUGEPAGES", RESTARTED)}
    env = {**env, "PYTHONPATH": ROOT, **extra}
    out = subprocess.run([sys.executable, "-m", "probe"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip(), env


def test_the_restart_happens_on_cpu_hosts_only_and_can_be_turned_off(tmp_path):
    tunable, env = _probe(tmp_path, JAX_PLATFORMS="cpu")
    assert tunable == (TUNABLE if hugepage_environ(env) is not None else "None")
    assert _probe(tmp_path, JAX_PLATFORMS="cpu", SEQJAX_HUGEPAGES="0")[0] == "None"
    assert _probe(tmp_path, JAX_PLATFORMS="cuda")[0] == "None"  # the steps' buffers would live on the device


def test_importing_the_experiments_changes_nothing_and_run_restarts_first(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SEQJAX_HUGEPAGES")}
    probe = "import os, experiments.seq2seq; print(os.environ.get('GLIBC_TUNABLES'))"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": ROOT}, cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "None"

    from experiments import common

    class Restarted(Exception):
        pass

    def restart():
        raise Restarted

    monkeypatch.setattr(runtime, "restart_with_hugepages_on_cpu", restart)
    monkeypatch.setattr(common, "parse_command_line", lambda *a: pytest.fail("parsed before the restart"))
    with pytest.raises(Restarted):
        common.run(object, "unused.py")
