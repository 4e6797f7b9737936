"""The reference attention kernel: the textbook softmax(Q Kᵀ · scale + bias) V with autodiff, the definition every
other kernel is tested against. It stores the [B..., N, Tq, Tk] probabilities for the backward pass, and it is the
only kernel that takes `bias` and returns the weights (the others hand such calls to it).

Glossary: B batch (B...), Tq / Tk query / key length, N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.kernels import common

Array = jax.Array


def masked_softmax(logits: Array, mask: Array | None) -> Array:
    """Softmax over the last axis; masked entries get 0 and a fully masked row is all zeros (no NaN)."""
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(s > 0, s, 1.0)


def dropout(weights: Array, rate: float, rng: Array) -> Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), jnp.zeros((), weights.dtype))


def attention_and_weights(q, k, v, mask, bias, scale, dropout_rate, dropout_rng, precision):
    """softmax(q kᵀ·scale + bias) v on checked arrays; returns (out [B..., Tq, N, H], weights [B..., N, Tq, Tk]).
    Grouped key/value heads (k, v `[B..., Tk, K, H]`, K < N) are read in place: the queries are viewed as
    `[B..., Tq, K, N/K, H]`, so k and v are never repeated."""
    acc = common.acc_dtype(q.dtype)
    *batch, tq, n, h = q.shape
    kv, tk = k.shape[-2], k.shape[-3]
    if kv < n:
        qg = q.reshape(*batch, tq, kv, n // kv, h)  # [B..., Tq, K, G, H]
        logits = jnp.einsum("...qkgh,...skh->...kgqs", qg, k, precision=precision, preferred_element_type=acc)
        logits = logits.reshape(*batch, n, tq, tk)  # [B..., N, Tq, Tk]
    else:
        logits = jnp.einsum("...qnh,...knh->...nqk", q, k, precision=precision, preferred_element_type=acc)
    logits = logits * jnp.asarray(scale, acc)
    if bias is not None:
        logits = logits + bias.astype(acc)
    weights = masked_softmax(logits, mask)
    probs = weights if dropout_rate == 0.0 else dropout(weights, dropout_rate, dropout_rng)
    if kv < n:
        probs = probs.reshape(*batch, kv, n // kv, tq, tk)  # [B..., K, G, Tq, Tk]
        out = jnp.einsum("...kgqs,...skh->...qkgh", probs.astype(v.dtype), v, precision=precision)
        return out.reshape(*batch, tq, n, v.shape[-1]), weights
    out = jnp.einsum("...nqk,...knh->...qnh", probs.astype(v.dtype), v, precision=precision)
    return out, weights


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
    is_causal: bool = False,
    segment_ids=None,
) -> Array | tuple[Array, Array]:
    """`seqjax.nn.scaled_dot_product_attention` computed plainly (see there for the arguments); `is_causal` and
    `segment_ids` are spelled out into the mask here (this is the definition)."""
    q, k, v, mask, bias, scale, rate = common.prepare(
        query, key, value, mask, bias, dropout_rate, dropout_rng, deterministic, scale
    )
    mask = common.dense_mask(mask, is_causal, common.segment_pair(segment_ids, q, k), q, k)
    out, weights = attention_and_weights(q, k, v, mask, bias, scale, rate, dropout_rng, precision)
    return (out, weights) if return_weights else out
