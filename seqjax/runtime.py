"""Process settings that make XLA faster on CPU hosts.

XLA's CPU runtime allocates each compiled program's temporary memory (often 100-300 MB for a training step) afresh
on every call; glibc serves allocations above 32 MB with a fresh `mmap`, so every step first page-faults through all
of it, 4 KB at a time (measured here: 30,000 faults per LSTM forward+backward, about a sixth of its time; see
BENCHMARKS.md). glibc >= 2.35 has a tunable that asks for transparent huge pages on those mappings, 2 MB per fault:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. Tunables are read when a process starts, so a running process cannot set it
for itself; `reexec_with_hugepages()` restarts the current command with it. The experiment entry points call
`restart_with_hugepages_on_cpu()` first thing in `experiments.common.run` (CPU hosts only: on a GPU/TPU host the
step's buffers live on the device) and log `hugepage_status()`. Set `SEQJAX_HUGEPAGES=0` to opt out; other
GLIBC_TUNABLES settings are left alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
RESTARTED = "SEQJAX_HUGEPAGES_RESTARTED"  # set in the restarted process's environment, so its log can say why


def hugepage_environ(environ: Mapping[str, str], libc: tuple[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with, or None where nothing is to change: not glibc >= 2.35 (macOS, musl),
    GLIBC_TUNABLES already set (by the user, or by an earlier restart), or SEQJAX_HUGEPAGES=0."""
    name, version = platform.libc_ver() if libc is None else libc
    if name != "glibc" or environ.get("SEQJAX_HUGEPAGES", "1") == "0" or "GLIBC_TUNABLES" in environ:
        return None
    try:
        major, minor = (int(v) for v in version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (2, 35):
        return None
    return {**environ, "GLIBC_TUNABLES": TUNABLE, RESTARTED: "1"}


def launched_module(argv: list[str]) -> str | None:
    """The module of a `python [options] -m MODULE ...` command line (`sys.orig_argv`); None for a script, `-c`, or
    an interactive interpreter."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("-X", "-W"):  # options whose value is the next argument
            i += 2
        elif arg.startswith("-") and arg != "-" and not arg.startswith("-c"):
            i += 1
        else:  # a script, "-" (stdin) or -c: what follows belongs to the program
            return None
    return None


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command (`sys.orig_argv`) with the tunable set, where
    `hugepage_environ` says to; returns where it does not (or where the restart cannot be made). Call it first thing
    in a program's entry point."""
    env = hugepage_environ(os.environ)
    if env is None or not sys.orig_argv or not sys.executable:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # carry on without the tunable
        return


def cpu_only(environ: Mapping[str, str]) -> bool:
    """Whether JAX will run on the CPU alone, decided without starting JAX: `JAX_PLATFORMS` names only "cpu", or it
    is unset and no accelerator plugin (a `jax_plugins` entry point: CUDA, ROCm; or libtpu) is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return all(p == "cpu" for p in platforms)
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and importlib.util.find_spec("libtpu") is None


def restart_with_hugepages_on_cpu() -> None:
    """`reexec_with_hugepages()` where JAX will run on the CPU alone (`cpu_only`); nothing on GPU/TPU hosts."""
    if cpu_only(os.environ):
        reexec_with_hugepages()


def hugepage_status(environ: Mapping[str, str] | None = None) -> str:
    """One line for a program's log: whether XLA's CPU buffers get glibc's huge pages, and how to change it."""
    environ = os.environ if environ is None else environ
    if environ.get(RESTARTED) == "1" and TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        how = f"restarted with GLIBC_TUNABLES={TUNABLE}; SEQJAX_HUGEPAGES=0 turns this off"
        return f"glibc huge pages on for XLA's CPU buffers ({how})"
    if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return f"glibc huge pages on for XLA's CPU buffers (GLIBC_TUNABLES={TUNABLE} set by the caller)"
    if environ.get("SEQJAX_HUGEPAGES", "1") == "0":
        return "glibc huge pages off (SEQJAX_HUGEPAGES=0)"
    if not cpu_only(environ):
        return "glibc huge pages not used: an accelerator runs the steps"
    return "glibc huge pages not used (not glibc >= 2.35, or GLIBC_TUNABLES set to something else)"
