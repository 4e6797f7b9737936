"""The C++ attention kernel (`attention.cc`): multi-head self-attention without dropout, forward and backward, from
the fused q/k/v projection, on a one-device CPU backend in float32 (`applies`). BENCHMARKS.md has why.

Glossary: B batch (B...), T length, N heads, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.kernels import blocked, common, cpu
from seqjax.kernels.cpu import ffi

Array = jax.Array

MAX_LENGTH = 2048  # the C++ kernel keeps two [T, T] score tiles per thread (32 MB at this length)


def applies(qkv: Array, rate: float, length: int) -> bool:
    """Whether self-attention on qkv runs the C++ kernel: float32, no dropout, at most MAX_LENGTH positions, a CPU
    backend with a single device, and the kernel built. With several devices the blocked kernel runs, since XLA
    cannot partition the custom call: under a batch-sharded `jit` it would gather the whole batch onto every
    device."""
    return (
        rate == 0.0
        and length <= MAX_LENGTH
        and qkv.dtype == jnp.float32
        and jax.default_backend() == "cpu"
        and common.single_device()
        and cpu.available()
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qkv_attention(qkv, mask, precision):
    """Self-attention without dropout from the fused projection qkv [B, T, 3, N, H] (q already scaled) → [B, T, N, H],
    by the C++ kernel where the program is lowered for a CPU, and by `reference_forward` / `_bwd` elsewhere
    (`lax.platform_dependent`): the same math in plain JAX ops, which the kernel's tests also use as a reference.
    Saves qkv, the kernel's mask, the output and the log-sum-exp of each query's scores."""
    return _fwd(qkv, mask, precision)[0]


def _kernel_mask(mask: Array | None, t: int) -> Array:
    """The kernel's mask: bool [B|1, N|1, T|1, T] (a mask that broadcasts over the keys is spelled out)."""
    if mask is None:
        return jnp.ones((1, 1, 1, t), bool)
    return jnp.broadcast_to(mask.astype(bool), (*mask.shape[:3], t))


def reference_forward(qkv, mask, precision=None):
    """(out [B, T, N, H], lse [B, N, T]) of softmax attention on qkv, mask [B|1, N|1, T|1, T]; a fully masked query
    gets a zero output and lse = +inf."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = jnp.where(mask, jnp.einsum("bqnh,bknh->bnqk", q, k, precision=precision), -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(e, axis=-1, keepdims=True)  # noqa: E741
    out = jnp.einsum("bnqk,bknh->bqnh", e / jnp.where(l > 0, l, 1.0), v, precision=precision)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)[..., 0]
    return out, lse


def reference_backward(qkv, mask, out, lse, dout, precision=None):
    """d(qkv) of `reference_forward` from its residuals: P recomputed from the scores and lse, D = rowsum(dO ∘ O)."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = jnp.einsum("bqnh,bknh->bnqk", q, k, precision=precision)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    dp = jnp.einsum("bqnh,bknh->bnqk", dout, v, precision=precision)
    ds = p * (dp - jnp.einsum("bqnh,bqnh->bnq", dout, out)[..., None])
    dq = jnp.einsum("bnqk,bknh->bqnh", ds, k, precision=precision)
    dk = jnp.einsum("bnqk,bqnh->bknh", ds, q, precision=precision)
    dv = jnp.einsum("bnqk,bqnh->bknh", p, dout, precision=precision)
    return jnp.stack([dq, dk, dv], axis=2)


_forward = ffi.kernel(
    "seqjax_attention_forward",
    reference_forward,
    lambda qkv, m: (ffi.f32(*qkv.shape[:2], *qkv.shape[3:]), ffi.f32(qkv.shape[0], qkv.shape[3], qkv.shape[1])),
)
_backward = ffi.kernel("seqjax_attention_backward", reference_backward, lambda qkv, *_: ffi.f32(*qkv.shape))


def _fwd(qkv, mask, precision):
    m = _kernel_mask(mask, qkv.shape[1])
    out, lse = _forward(qkv, m, precision=precision)
    return out, (qkv, m, out, lse)


def _bwd(precision, res, dout):
    return _backward(*res, jnp.asarray(dout, jnp.float32), precision=precision), None


qkv_attention.defvjp(_fwd, _bwd)


def self_attention(
    qkv: Array,
    mask: Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    precision: lax.PrecisionLike = None,
    is_causal: bool = False,
    segment_ids=None,
) -> Array:
    """`blocked.self_attention`'s function (qkv `[B..., T, 3, N, H]`, q already scaled → `[B..., T, N, H]`) by the
    C++ kernel where it `applies` (also within one block: it keeps qkv, the output and a log-sum-exp for the backward
    pass, not the [B, N, T, T] probabilities and masks, which in a small model are what pushes the training step's
    temporary memory over glibc's mmap threshold; BENCHMARKS.md, "nanoGPT's CPU shape"), else by `blocked`.
    The C++ kernel takes only a mask: `is_causal` and `segment_ids` are spelled out into it, which stays small
    since the kernel applies only up to MAX_LENGTH positions (longer sequences run `blocked`, which builds none)."""
    *batch, t, _, n, h = qkv.shape
    b = math.prod(batch)
    if not applies(qkv, dropout_rate, t):
        return blocked.self_attention(qkv, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                                      precision=precision, is_causal=is_causal,
                                      segment_ids=segment_ids)  # fmt: skip
    q, k, v = common.split_qkv(qkv)
    common.check_shapes(q, k, v, mask, None)
    common.check_mask_dtype(mask)
    mask = None if mask is None else jnp.asarray(mask)
    mask = common.dense_mask(mask, is_causal, common.segment_pair(segment_ids, q, k), q, k)
    flat = common.flat_mask(mask, tuple(batch))
    return qkv_attention(qkv.reshape(b, t, 3, n, h), flat, precision).reshape(*batch, t, n, h)


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
    """`seqjax.nn.scaled_dot_product_attention` by the C++ kernel where a call is self-attention shaped (Tq = Tk,
    one head dim) and `self_attention` takes it (q, k and v are stacked into one array, grouped key/value heads
    repeated into it: a copy that the fused projection of `MultiHeadAttention` avoids), else by `blocked`."""
    q, k, v, mask, bias, scale, rate = common.prepare(
        query, key, value, mask, bias, dropout_rate, dropout_rng, deterministic, scale
    )
    if bias is not None or return_weights or q.shape[:-2] != k.shape[:-2] or v.shape != k.shape:
        return blocked.attention(q, k, v, mask, bias=bias, dropout_rate=rate, dropout_rng=dropout_rng,
                                 deterministic=rate == 0.0, return_weights=return_weights, scale=scale,
                                 precision=precision, is_causal=is_causal, segment_ids=segment_ids)  # fmt: skip
    k, v = common.repeat_kv(k, v, q.shape[-2])  # the kernel reads one k/v head per query head
    qkv = jnp.stack([q * jnp.asarray(scale, q.dtype), k, v], axis=-3)  # [B..., T, 3, N, H]
    out = self_attention(qkv, mask, dropout_rate=rate, dropout_rng=dropout_rng, precision=precision,
                         is_causal=is_causal, segment_ids=segment_ids)  # fmt: skip
    return out.astype(value.dtype)
