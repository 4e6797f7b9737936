"""Test-wide JAX settings: 8 CPU devices for the multi-device tests, strict dtype promotion, PRNG keys."""

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
