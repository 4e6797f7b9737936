"""Losses.

`fused_linear_cross_entropy` computes the softmax cross-entropy of a linear output layer chunk by chunk, without
ever holding the `[N, V]` logits: in the forward pass each chunk's logits give its loss and, at once, its
gradients (softmax minus one-hot), which are pushed through the layer's matmuls right away (as Liger-Kernel's
fused linear cross-entropy does). The backward pass then only scales the saved gradients. Same FLOPs as the plain
formulation, no `[N, V]` buffers.

Glossary: N tokens (any leading dims, flattened), D width, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.training.metrics import TINY, Mean, values

Array = jax.Array


def _chunk_loss_and_grads(xc, labels_c, weight_c, kernel, bias, precision):
    """One chunk: weighted summed loss and its gradient with respect to the logits `[C, V]`, in float32. The label's
    logit is read through a one-hot, so a label outside [0, V) picks nothing and loss and gradient stay consistent."""
    logits = jnp.dot(xc, kernel, precision=precision, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels_c, logits.shape[-1], dtype=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    loss = jnp.sum(weight_c * (lse - jnp.sum(onehot * logits, axis=-1)))
    dlogits = (jnp.exp(logits - lse[:, None]) - onehot) * weight_c[:, None]
    return loss, dlogits


def _layout(x, labels, weights, chunk_size):
    """Pads the N rows up to a multiple of the chunk size (padded rows weigh 0); returns the chunk size too."""
    n = x.shape[0]
    c = max(1, min(chunk_size, n))
    pad = -n % c
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    return x, labels, weights, c


def _scale(weights, normalize):
    """What the summed loss is multiplied by: 1 / the total weight for the mean, 1 for the sum."""
    return 1.0 / jnp.maximum(weights.sum(), TINY) if normalize else jnp.ones((), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x, kernel, bias, labels, weights, chunk_size, precision, normalize):
    xp, lp, wp, c = _layout(x, labels, weights, chunk_size)
    kernel = kernel.astype(x.dtype)

    def body(total, i):
        take = lambda a: lax.dynamic_slice_in_dim(a, i * c, c)
        loss, _ = _chunk_loss_and_grads(take(xp), take(lp), take(wp), kernel, bias, precision)
        return total + loss, None

    total, _ = lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(xp.shape[0] // c))
    return total * _scale(weights, normalize)


def _fused_fwd(x, kernel, bias, labels, weights, chunk_size, precision, normalize):
    n, d = x.shape
    xp, lp, wp, c = _layout(x, labels, weights, chunk_size)
    k = kernel.astype(x.dtype)  # matmuls in the inputs' dtype, accumulated in float32

    def body(carry, i):
        total, dkernel, dbias = carry
        take = lambda a: lax.dynamic_slice_in_dim(a, i * c, c)
        xc = take(xp)
        loss, dlogits = _chunk_loss_and_grads(xc, take(lp), take(wp), k, bias, precision)
        dx = jnp.dot(dlogits.astype(x.dtype), k.T, precision=precision)  # [C, D]
        dkernel = dkernel + jnp.dot(
            xc.T, dlogits.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32
        )
        if dbias is not None:
            dbias = dbias + jnp.sum(dlogits, axis=0)
        return (total + loss, dkernel, dbias), dx

    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros(kernel.shape, jnp.float32),
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
    )
    (total, dkernel, dbias), dx = lax.scan(body, init, jnp.arange(xp.shape[0] // c))
    scale = _scale(weights, normalize)
    grads = (
        (dx.reshape(-1, d)[:n].astype(jnp.float32) * scale).astype(x.dtype),
        (dkernel * scale).astype(kernel.dtype),
        None if bias is None else (dbias * scale).astype(bias.dtype),
    )
    return total * scale, (grads, labels, weights)


def _fused_bwd(chunk_size, precision, normalize, res, ct):
    (dx, dkernel, dbias), labels, weights = res
    scale = lambda g: None if g is None else (g * ct.astype(g.dtype))
    return scale(dx), scale(dkernel), scale(dbias), jnp.zeros(labels.shape, jax.dtypes.float0), jnp.zeros_like(weights)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_cross_entropy(
    x: Array,
    kernel: Array,
    bias: Array | None,
    labels: Array,
    *,
    where: Array | None = None,
    chunk_size: int = 512,
    precision: lax.PrecisionLike = None,
    as_mean: bool = False,
) -> Array | Mean:
    """Mean softmax cross-entropy of `x @ kernel + bias` against integer `labels`, without `[N, V]` logits.

    Args:
      x: `[N..., D]` inputs of the output layer (float32 or bfloat16; the matmuls run in x's dtype and accumulate
        in float32, the loss is float32).
      kernel: `[D, V]`; bias: `[V]` or None.
      labels: integer `[N...]` in [0, V) (a label outside it picks no logit: the loss is then the log-sum-exp).
      where: optional bool `[N...]`: tokens to average over (e.g. not padding); the others count for nothing.
      chunk_size: tokens per chunk (N is padded up to a multiple); chunk logits `[C, V]` should fit in cache.
      as_mean: return a `seqjax.training.metrics.Mean` (the summed loss, differentiable, and the number of selected
        tokens), for the steps to reduce over devices before dividing (see `cross_entropy`).

    Returns:
      The mean loss over the selected tokens (float32 scalar). Differentiable in x, kernel and bias.
    """
    x, labels = jnp.asarray(x), jnp.asarray(labels)
    if x.shape[:-1] != labels.shape or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1] or labels.size == 0:
        raise ValueError(
            f"fused_linear_cross_entropy: x {x.shape} must be [N..., D] with labels {labels.shape} = [N...] (N > 0) "
            f"and kernel {kernel.shape} = [D, V]"
        )
    if bias is not None and bias.shape != kernel.shape[1:]:
        raise ValueError(f"fused_linear_cross_entropy: bias {bias.shape} must be [V] = {kernel.shape[1:]}")
    if where is not None and jnp.shape(where) != labels.shape:
        raise ValueError(f"fused_linear_cross_entropy: where {jnp.shape(where)} must match labels {labels.shape}")
    weights = jnp.ones(labels.shape, jnp.float32) if where is None else jnp.asarray(where).astype(jnp.float32)
    args = (x.reshape(-1, x.shape[-1]), kernel, bias, labels.reshape(-1), weights.reshape(-1), chunk_size, precision)
    if as_mean:
        return Mean(_fused(*args, False), weights.sum())
    return _fused(*args, True)


def cross_entropy(
    logits: Array,
    labels: Array,
    *,
    weights: Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    as_mean: bool = False,
) -> tuple[Array | Mean, dict[str, Array | Mean]]:
    """Weighted softmax cross-entropy with label smoothing and z-loss, averaged over the weights.

    Args:
      logits: `[N..., V]` (computed in float32).
      labels: integer `[N...]`.
      weights: `[N...]` (e.g. 0 on padding); None: all 1.
      label_smoothing: ε: the target is (1 - ε) one-hot + ε / V uniform (Szegedy et al. 2016).
      z_loss: coefficient of log(Z)² (PaLM), which keeps the softmax normaliser near 1.
      as_mean: return the loss and the averaged aux entries as `seqjax.training.metrics.Mean`s (weighted sums and
        their weight, not yet divided): a task's `loss_fn` / `metric_fn` returns these so that the steps reduce them
        over devices and batches before dividing (the same numbers under every parallel mode).

    Returns:
      `(loss, aux)`: the weighted mean of cross-entropy + z-loss; aux "cross_entropy", "z_loss", "accuracy" (all
      weighted means) and "weight" (the sum of the weights).
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} must be [N..., V] for labels {labels.shape}")
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:  # arrays: a sweep's, traced
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    v = logits.shape[-1]
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else jnp.asarray(weights).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jax.nn.one_hot(labels, v, dtype=jnp.float32) * (1.0 - label_smoothing) + label_smoothing / v
    ce = lse - jnp.sum(target * logits, axis=-1)
    zl = z_loss * lse**2
    means = {
        "loss": Mean.of(ce + zl, w),
        "cross_entropy": Mean.of(ce, w),
        "z_loss": Mean.of(zl, w),
        "accuracy": Mean.of((jnp.argmax(logits, -1) == labels).astype(jnp.float32), w),
    }
    if not as_mean:
        means = values(means)
    loss = means.pop("loss")
    return loss, {**means, "weight": w.sum()}


def mean_squared_error(
    predictions: Array, targets: Array, *, weights: Array | None = None, as_mean: bool = False
) -> Array | Mean:
    """Weighted mean of the squared error, averaged over all elements (weights broadcast to them); `as_mean`: as a
    `seqjax.training.metrics.Mean` (see `cross_entropy`)."""
    err = (jnp.asarray(predictions) - jnp.asarray(targets)).astype(jnp.float32) ** 2
    if weights is None:
        mean = Mean.of(err)
    else:
        w = jnp.asarray(weights).astype(jnp.float32)
        mean = Mean.of(err, w.reshape(w.shape + (1,) * (err.ndim - w.ndim)))
    return mean if as_mean else mean.value()
