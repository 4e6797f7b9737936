"""fused_linear_cross_entropy against optax's plain cross-entropy on materialised logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from seqjax.training.losses import fused_linear_cross_entropy


def _problem(rng, lead=(3, 20), d=16, v=37, dtype=jnp.float32):
    k = jax.random.split(rng, 4)
    x = jax.random.normal(k[0], (*lead, d), dtype)
    kernel = (jax.random.normal(k[1], (d, v)) * 0.4).astype(dtype)
    bias = jax.random.normal(k[2], (v,)).astype(dtype)
    labels = jax.random.randint(k[3], lead, 0, v)
    return x, kernel, bias, labels


def _plain(x, kernel, bias, labels):
    logits = x @ kernel + (0 if bias is None else bias)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 60, 512])  # 7 does not divide 60 tokens: 6 is used
@pytest.mark.parametrize("with_bias", [True, False])
def test_value_and_gradients_match_plain_loss(rng, chunk_size, with_bias):
    x, kernel, bias, labels = _problem(rng)
    bias = bias if with_bias else None
    fused = lambda x, k, b: 2.5 * fused_linear_cross_entropy(x, k, b, labels, chunk_size=chunk_size)
    plain = lambda x, k, b: 2.5 * _plain(x, k, b, labels)
    np.testing.assert_allclose(jax.jit(fused)(x, kernel, bias), plain(x, kernel, bias), rtol=1e-6)
    args = (0, 1, 2) if with_bias else (0, 1)
    got = jax.jit(jax.grad(fused, argnums=args))(x, kernel, bias)
    want = jax.grad(plain, argnums=args)(x, kernel, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_check_grads_float64(rng, x64):
    x, kernel, bias, labels = _problem(rng, lead=(10,), d=5, v=7, dtype=jnp.float64)
    check_grads(
        lambda x, k, b: fused_linear_cross_entropy(x, k, b, labels, chunk_size=4), (x, kernel, bias), order=1,
        modes=["rev"],
    )  # fmt: skip


def test_bad_shapes_are_named(rng):
    x, kernel, bias, labels = _problem(rng)
    with pytest.raises(ValueError, match=r"labels \(3, 19\)"):
        fused_linear_cross_entropy(x, kernel, bias, labels[:, :19])
    with pytest.raises(ValueError, match=r"kernel \(15, 37\)"):
        fused_linear_cross_entropy(x, kernel[:15], bias, labels)
    with pytest.raises(ValueError, match=r"bias \(36,\)"):
        fused_linear_cross_entropy(x, kernel, bias[:36], labels)
