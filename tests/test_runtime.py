"""seqjax.runtime: when the huge-page tunable is added to the environment, and that the experiments' entry points
restart with it while importing them elsewhere does not."""

import os
import subprocess
import sys

from seqjax.runtime import TUNABLE, hugepage_environ, launched_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hugepage_environ_decides_by_libc_version_and_settings():
    env = {"PATH": "/bin"}
    assert hugepage_environ(env, ("glibc", "2.36")) == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
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


def test_experiment_modules_restart_with_the_tunable_and_imports_do_not(tmp_path):
    probe = "import os, experiments; print(os.environ.get('GLIBC_TUNABLES'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SEQJAX_HUGEPAGES")}
    env["PYTHONPATH"] = ROOT
    imported = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "None"
    # The same probe run as an experiments module (`-m experiments.NAME`), from a package copy holding it.
    pkg = tmp_path / "experiments"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(open(os.path.join(ROOT, "experiments", "__init__.py")).read())
    (pkg / "probe.py").write_text(probe.replace("import os, experiments", "import os"))
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"

    def probe_run(**extra):
        cmd = [sys.executable, "-m", "experiments.probe"]
        out = subprocess.run(cmd, env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert probe_run() == (TUNABLE if hugepage_environ(env) is not None else "None")
    assert probe_run(SEQJAX_HUGEPAGES="0") == "None"
