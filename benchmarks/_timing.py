"""Shared timing for the benchmark scripts."""

from __future__ import annotations

import importlib.util
import statistics
import time


def torch_available() -> bool:
    """Whether torch can be imported, to add it as a contender."""
    return importlib.util.find_spec("torch") is not None


def interleaved_times(steps: dict, repeats: int) -> dict:
    """Every timed run of each step, in interleaved rounds (A B C A B C ...) so that drifts in machine load fall
    on every contender alike; round i of each list ran side by side. Each step runs twice first (compilation,
    allocator warm-up), and each timed step follows a 0.1 s pause so that the previous contender's worker threads
    (torch's OpenMP spin-waits) are idle."""
    for step in steps.values():
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            time.sleep(0.1)
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def medians(times: dict) -> dict:
    """Median of each step's runs in `interleaved_times`' result."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_medians(steps: dict, repeats: int) -> dict:
    """Median time of each step over `interleaved_times`."""
    return medians(interleaved_times(steps, repeats))


def paired_ratios(reference: list, contender: list) -> list:
    """Speed ratio of a contender to a reference in each round (reference time / contender time), from two lists
    of `interleaved_times`: how a median ratio spreads over the rounds."""
    return [r / c for r, c in zip(reference, contender, strict=True)]


def matmul_peak_step(n: int, dtype: str = "float32"):
    """A jit-compiled n x n x n `jnp.dot` in `dtype` as a step to time, and its FLOPs (2 n^3): the peer that gives
    "fraction of the machine's matmul peak" (time it in the same run as the contender)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a))
    return (lambda: jax.block_until_ready(mm(a))), 2 * n**3
