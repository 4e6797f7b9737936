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

Array = jax.Array


def _chunks(n: int, chunk_size: int) -> int:
    """The largest divisor of n that is at most chunk_size (so chunks tile the tokens exactly)."""
    size = max(1, min(chunk_size, n))
    while n % size:
        size -= 1
    return size


def _chunk_loss_and_grads(xc, labels_c, kernel, bias, precision):
    """One chunk: summed loss and d(sum loss)/d(logits) [C, V], in float32."""
    logits = jnp.dot(xc, kernel, precision=precision, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    picked = jnp.take_along_axis(logits, labels_c[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None])
    dlogits = probs - jax.nn.one_hot(labels_c, logits.shape[-1], dtype=jnp.float32)
    return jnp.sum(lse - picked), dlogits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(x, kernel, bias, labels, chunk_size, precision):
    n = x.shape[0]
    c = _chunks(n, chunk_size)

    def body(total, i):
        xc = lax.dynamic_slice_in_dim(x, i * c, c)
        lc = lax.dynamic_slice_in_dim(labels, i * c, c)
        logits = jnp.dot(xc, kernel, precision=precision, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        picked = jnp.take_along_axis(logits, lc[:, None], axis=-1)[:, 0]
        return total + jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked), None

    total, _ = lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(n // c))
    return total / n


def _fused_fwd(x, kernel, bias, labels, chunk_size, precision):
    n, d = x.shape
    c = _chunks(n, chunk_size)
    scale = 1.0 / n

    def body(carry, i):
        total, dkernel, dbias = carry
        xc = lax.dynamic_slice_in_dim(x, i * c, c)
        loss, dlogits = _chunk_loss_and_grads(xc, lax.dynamic_slice_in_dim(labels, i * c, c), kernel, bias, precision)
        dlogits = dlogits * scale
        dx = jnp.dot(dlogits.astype(x.dtype), kernel.T, precision=precision)  # [C, D]
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
    (total, dkernel, dbias), dx = lax.scan(body, init, jnp.arange(n // c))
    grads = (dx.reshape(n, d), dkernel.astype(kernel.dtype), None if bias is None else dbias.astype(bias.dtype))
    return total * scale, (grads, labels)


def _fused_bwd(chunk_size, precision, res, ct):
    (dx, dkernel, dbias), labels = res
    scale = lambda g: None if g is None else (g * ct.astype(g.dtype))
    zero_labels = jnp.zeros(labels.shape, jax.dtypes.float0)
    return scale(dx), scale(dkernel), scale(dbias), zero_labels


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_cross_entropy(
    x: Array,
    kernel: Array,
    bias: Array | None,
    labels: Array,
    *,
    chunk_size: int = 512,
    precision: lax.PrecisionLike = None,
) -> Array:
    """Mean softmax cross-entropy of `x @ kernel + bias` against integer `labels`, without `[N, V]` logits.

    Args:
      x: `[N..., D]` inputs of the output layer.
      kernel: `[D, V]`; bias: `[V]` or None.
      labels: integer `[N...]`, each in [0, V).
      chunk_size: tokens per chunk (a divisor of N is used); chunk logits `[C, V]` should fit in cache.

    Returns:
      The mean loss over all N tokens (float32 scalar). Differentiable in x, kernel and bias.
    """
    x, labels = jnp.asarray(x), jnp.asarray(labels)
    if x.shape[:-1] != labels.shape or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(
            f"fused_linear_cross_entropy: x {x.shape} must be [N..., D] with labels {labels.shape} = [N...] and "
            f"kernel {kernel.shape} = [D, V]"
        )
    if bias is not None and bias.shape != kernel.shape[1:]:
        raise ValueError(f"fused_linear_cross_entropy: bias {bias.shape} must be [V] = {kernel.shape[1:]}")
    return _fused(x.reshape(-1, x.shape[-1]), kernel, bias, labels.reshape(-1), chunk_size, precision)
