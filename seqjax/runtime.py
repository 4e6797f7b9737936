"""Process settings that make XLA faster on CPU hosts.

XLA's CPU runtime allocates each compiled program's temporary memory (often 100-300 MB for a training step) afresh
on every call; glibc serves allocations above 32 MB with a fresh `mmap`, so every step first page-faults through all
of it, 4 KB at a time (measured here: 30,000 faults per LSTM forward+backward, about a sixth of its time; see
BENCHMARKS.md). glibc >= 2.35 has a tunable that asks for transparent huge pages on those mappings, 2 MB per fault:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. Tunables are read when a process starts, so a running process cannot set it
for itself; `reexec_with_hugepages()` restarts the current command with it (the experiment entry points do this
before importing JAX). Set `SEQJAX_HUGEPAGES=0` to opt out; other GLIBC_TUNABLES settings are left alone.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"


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
    return {**environ, "GLIBC_TUNABLES": TUNABLE}


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
