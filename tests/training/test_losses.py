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


@pytest.mark.slow_beyond(7)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 60, 512])  # 7 does not divide 60 tokens: padded to 63
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_where_averages_over_selected_tokens(rng):
    x, kernel, bias, labels = _problem(rng)
    where = jax.random.bernoulli(jax.random.fold_in(rng, 5), 0.6, labels.shape)
    fused = lambda x, k: fused_linear_cross_entropy(x, k, bias, labels, where=where, chunk_size=8)

    def plain(x, k):
        nll = optax.softmax_cross_entropy_with_integer_labels(x @ k + bias, labels)
        return jnp.sum(jnp.where(where, nll, 0.0)) / jnp.sum(where.astype(jnp.float32))

    np.testing.assert_allclose(fused(x, kernel), plain(x, kernel), rtol=1e-6)
    for g, w in zip(jax.grad(fused, (0, 1))(x, kernel), jax.grad(plain, (0, 1))(x, kernel), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_bfloat16_inputs_keep_their_dtype(rng):
    x, kernel, bias, labels = _problem(rng, dtype=jnp.bfloat16)
    loss, grads = jax.value_and_grad(lambda x, k: fused_linear_cross_entropy(x, k, None, labels), (0, 1))(x, kernel)
    assert loss.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    ref = _plain(x.astype(jnp.float32), kernel.astype(jnp.float32), None, labels)
    np.testing.assert_allclose(loss, ref, rtol=2e-2)
    # float32 parameters with bfloat16 activations (mixed precision) also work under strict promotion.
    fused_linear_cross_entropy(x, kernel.astype(jnp.float32), bias.astype(jnp.float32), labels)


@pytest.mark.slow
def test_label_outside_vocabulary_gives_consistent_loss_and_gradient(rng):
    x, kernel, bias, _ = _problem(rng, lead=(4,), v=5)
    labels = jnp.array([0, 7, -1, 4])
    loss_fn = lambda x: fused_linear_cross_entropy(x, kernel, bias, labels)
    logits = x @ kernel + bias
    onehot = jax.nn.one_hot(labels, 5)  # all zeros for 7 and -1
    ref_fn = lambda x: jnp.mean(jax.nn.logsumexp(x @ kernel + bias, -1) - jnp.sum(onehot * (x @ kernel + bias), -1))
    np.testing.assert_allclose(loss_fn(x), ref_fn(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss_fn)(x), jax.grad(ref_fn)(x), rtol=1e-5, atol=1e-7)
    assert np.isfinite(loss_fn(x)) and logits.shape == (4, 5)
