"""seqjax.nn.LayerNorm against flax's nn.LayerNorm (same parameters and forward, gradients by autodiff), its
numerical gradients, and what its backward pass keeps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from seqjax.nn.norm import LayerNorm, layer_norm


def normal(shape, dtype=np.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 32), (1, 1, 3)])
def test_matches_flax(shape):
    x = 3.0 * normal(shape) + 1.0
    flax_ln, ours = nn.LayerNorm(), LayerNorm()
    variables = flax_ln.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(0), x))
    variables = jax.tree.map(lambda a: a + normal(a.shape, seed=a.size), variables)
    np.testing.assert_array_equal(ours.apply(variables, x), flax_ln.apply(variables, x))

    def loss(module):
        weights = normal(shape, seed=5)
        return lambda v, x: jnp.sum(module.apply(v, x) * weights) ** 2

    want = jax.grad(loss(flax_ln), argnums=(0, 1))(variables, x)
    got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_check_grads_float64(x64):
    x, scale, bias = normal((3, 4, 8), np.float64), normal((8,), np.float64, 1), normal((8,), np.float64, 2)
    check_grads(lambda x, s, b: layer_norm(x, s, b, 1e-6), (x, scale, bias), order=1, modes=["rev"])


def test_backward_keeps_the_input_and_two_statistics():
    """The vjp closes over x [B, T, D] and [B, T, 1] statistics (and the [D] scale), no other [B, T, D] array."""
    x, scale, bias = normal((4, 6, 32)), normal((32,), seed=1), normal((32,), seed=2)
    _, vjp = jax.vjp(lambda x, s, b: layer_norm(x, s, b, 1e-6), x, scale, bias)
    full = [a for a in jax.tree.leaves(vjp) if getattr(a, "shape", None) == x.shape]
    assert len(full) == 1


def test_compute_dtype():
    x = normal((2, 3, 8)).astype(jnp.bfloat16)
    y, variables = LayerNorm(dtype=jnp.float32).init_with_output(jax.random.key(0), x)
    assert y.dtype == jnp.float32 and variables["params"]["scale"].dtype == jnp.float32
    assert LayerNorm().apply(variables, x).dtype == jnp.bfloat16
