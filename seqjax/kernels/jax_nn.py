"""The `jax` attention kernel: `jax.nn.dot_product_attention`, with cuDNN's fused attention on an NVIDIA GPU where
it applies and XLA's formulation elsewhere (the default on GPU and TPU).

jax.nn.dot_product_attention has neither dropout nor the weights, and needs value's head dim to equal the query's:
such calls go to `blocked` (`applies` says which). A fully masked query row returns zeros, as in the other kernels.
Grouped key/value heads (K < N) are passed as they are: jax.nn (XLA's formulation and cuDNN) groups the query heads
itself, without repeating k and v.

Glossary: B batch (B...), Tq / Tk query / key length, N heads, H head dim, K key/value heads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.kernels import blocked, common

Array = jax.Array


def applies(query: Array, key: Array, value: Array, dropout_rate: float, return_weights: bool) -> bool:
    """Whether jax.nn.dot_product_attention computes this call: no dropout, no weights, one dtype, value's head dim
    equal to the query's."""
    return (
        dropout_rate == 0.0
        and not return_weights
        and value.shape[-1] == query.shape[-1]
        and jnp.dtype(query.dtype) == jnp.dtype(key.dtype) == jnp.dtype(value.dtype)
    )


@functools.cache
def cudnn_available() -> bool:
    """Whether JAX's default backend is an NVIDIA GPU (cuDNN's attention is traced only there)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        from jax.extend import backend  # not imported by `import jax`

        return "cuda" in backend.get_backend().platform_version.lower()
    except Exception:  # an unusual plugin: XLA's formulation is always correct
        return False


def cudnn_applies(query: Array, key: Array, value: Array, bias: Array | None) -> bool:
    """Whether cuDNN's fused attention takes this call: an NVIDIA GPU, float16 / bfloat16, a head dim that is a
    multiple of 8 up to 128, no bias."""
    h = query.shape[-1]
    return (
        cudnn_available()
        and jnp.dtype(query.dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
        and h <= 128
        and h % 8 == 0
        and bias is None
    )


def attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    scale: float | None = None,
    precision: lax.PrecisionLike = None,
    implementation: str | None = None,
    is_causal: bool = False,
    segment_ids=None,
) -> Array | tuple[Array, Array]:
    """`seqjax.nn.scaled_dot_product_attention` by jax.nn.dot_product_attention; `implementation` is its own
    ("xla", "cudnn"; None: cuDNN where `cudnn_applies`, else XLA). Calls it cannot take go to `blocked`.
    `is_causal` is jax.nn's own (top-left aligned, as seqjax's); jax.nn has no segment ids, so they become a mask
    (XLA's formulation builds the [Tq, Tk] scores anyway)."""
    q, k, v, mask, bias, scale, rate = common.prepare(
        query, key, value, mask, bias, dropout_rate, dropout_rng, deterministic, scale
    )
    causal = dict(is_causal=is_causal, segment_ids=segment_ids)
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU; JAX's backend here is {jax.default_backend()!r}")
    if not applies(q, k, v, rate, return_weights):
        if implementation == "cudnn":
            raise ValueError("cuDNN's attention supports neither dropout nor return_weights")
        return blocked.attention(q, k, v, mask, bias=bias, dropout_rate=rate, dropout_rng=dropout_rng,
                                 deterministic=rate == 0.0, return_weights=return_weights, scale=scale,
                                 precision=precision, **causal)  # fmt: skip
    mask = common.dense_mask(mask, False, common.segment_pair(segment_ids, q, k), q, k)
    if implementation is None:
        implementation = "cudnn" if cudnn_applies(q, k, v, bias) else "xla"
    batch = q.shape[:-3]
    flat = lambda x: x.reshape(-1, *x.shape[-3:])
    full = (math.prod(batch), q.shape[-2], q.shape[-3], k.shape[-3])
    m = None if mask is None else jnp.broadcast_to(common.flat_mask(mask, batch), full)
    bi = None if bias is None else jnp.broadcast_to(bias, (*batch, *bias.shape[-3:])).reshape(-1, *bias.shape[-3:])
    # jax.nn promotes half-precision queries with float32 itself, which strict dtype promotion (seqjax's tests, and
    # users who turn it on) refuses inside jax.
    with jax.numpy_dtype_promotion("standard"):
        out = jax.nn.dot_product_attention(
            flat(q), flat(k), flat(v), bias=bi, mask=m, scale=scale, is_causal=is_causal,
            implementation=implementation,
        )  # fmt: skip
    if m is not None:  # fully masked rows: zeros, as the other kernels return
        any_valid = jnp.any(m & common.causal_mask(*m.shape[-2:]) if is_causal else m, axis=-1)  # [B, N, Tq]
        out = jnp.where(jnp.swapaxes(any_valid, 1, 2)[..., None], out, jnp.zeros((), out.dtype))
    return out.astype(value.dtype).reshape(*batch, *out.shape[1:])


def xla_attention(*args, **kwargs):
    """`attention` with XLA's formulation (the TPU default)."""
    return attention(*args, implementation="xla", **kwargs)


def cudnn_attention(*args, **kwargs):
    """`attention` by cuDNN only (an NVIDIA GPU; an error elsewhere)."""
    return attention(*args, implementation="cudnn", **kwargs)
