"""LayerNorm over the last axis with a hand-written backward pass that keeps only the input and two statistics.

Glossary: B batch (any number of leading dims, written B...), D features.

Autodiff of flax's `nn.LayerNorm` keeps about three `[B..., D]` arrays per call alive until the backward pass (the
centred input, its square, the normalised input); this one keeps the input alone (which the residual stream holds
anyway) plus the mean and the reciprocal standard deviation `[B..., 1]`, as torch's LayerNorm does. In a small
Transformer on CPU that is the difference between a compiled training step whose temporary memory is served from
the heap and one that is mapped and page-faulted afresh on every call (BENCHMARKS.md, "nanoGPT's CPU shape").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def _stats(x: Array, epsilon: float) -> tuple[Array, Array]:
    """Mean and 1/sqrt(var + eps) over the last axis, `[B..., 1]`; flax's formula (E[x^2] - E[x]^2, clipped at 0)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(lax.square(x), axis=-1, keepdims=True) - lax.square(mean))
    return mean, lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float = 1e-6) -> Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias` over the last axis of x `[B..., D]`; scale, bias `[D]`."""
    mean, rstd = _stats(x, epsilon)
    return (x - mean) * (rstd * scale) + bias


def _fwd(x, scale, bias, epsilon=1e-6):
    mean, rstd = _stats(x, epsilon)
    return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _bwd(epsilon, res, dy):
    x, mean, rstd, scale = res
    xhat = (x - mean) * rstd  # [B..., D], recomputed
    g = dy * scale
    d = x.shape[-1]
    dx = rstd * (g - jnp.sum(g, axis=-1, keepdims=True) / d - xhat * (jnp.sum(g * xhat, axis=-1, keepdims=True) / d))
    batch_axes = tuple(range(x.ndim - 1))
    dscale = jnp.sum(dy * xhat, axis=batch_axes).astype(scale.dtype)
    dbias = jnp.sum(dy, axis=batch_axes).astype(scale.dtype)
    return dx, dscale, dbias


layer_norm.defvjp(_fwd, _bwd)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis: flax `nn.LayerNorm`'s parameters ("scale" and "bias", `[D]`), default epsilon
    and forward formula, with `layer_norm`'s backward pass. `[B..., D] -> [B..., D]` in `dtype`.

    Attributes:
      epsilon: added to the variance.
      dtype: compute and output dtype (default: the input's).
      param_dtype: storage dtype of scale and bias.
      scale_init, bias_init: their initialisers.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones_init()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.asarray(x)
        d = x.shape[-1]
        scale = self.param("scale", self.scale_init, (d,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (d,), self.param_dtype)
        dtype = self.dtype or x.dtype
        return layer_norm(x.astype(dtype), scale.astype(dtype), bias.astype(dtype), self.epsilon)
