"""Test-wide JAX settings (8 CPU devices for the multi-device tests, strict dtype promotion, PRNG keys) and the
`slow_beyond(k)` mark: the first k cases of a parametrized test stay in the fast tier, the others join the slow one."""

import collections
import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
    """A fresh PRNG key; tests split or fold_in it for independent streams."""
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Enables float64 for the duration of one test (for check_grads and tight references)."""
    with jax.enable_x64(True):
        yield


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks
def pytest_collection_modifyitems(config, items):
    seen = collections.Counter()
    for item in items:
        mark = item.get_closest_marker("slow_beyond")
        if mark is None:
            continue
        key = (item.path, item.originalname)
        if seen[key] >= mark.args[0]:
            item.add_marker(pytest.mark.slow)
        seen[key] += 1
