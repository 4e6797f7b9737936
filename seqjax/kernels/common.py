"""What every attention kernel shares: argument checks, the accumulation dtype, flat-batch masks, the device count,
grouped key/value heads.

Glossary: B batch (any number of leading dims, B...), Tq / Tk query / key length, N heads, H head dim, K key/value
heads (grouped-query attention: N a multiple of K, query head n reads key/value head n // (N/K); K = 1 is
multi-query attention).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def check_shapes(query: Array, key: Array, value: Array, mask: Array | None, bias: Array | None) -> None:
    """Raises a ValueError naming the shapes unless query is [B..., Tq, N, H], key/value [B..., Tk, K, H] with N a
    multiple of K (value's H may differ) and mask / bias broadcast to [B..., N, Tq, Tk] with the same rank."""
    if query.ndim < 3:
        raise ValueError(f"query must be [B..., Tq, N, H] (rank >= 3), got shape {query.shape}")
    if key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            f"query, key and value must have the same rank; got query {query.shape}, key {key.shape}, "
            f"value {value.shape}"
        )
    if key.shape != value.shape[:-1] + key.shape[-1:] or key.shape[:-3] != query.shape[:-3]:
        raise ValueError(
            f"expected query [B..., Tq, N, H] and key/value [B..., Tk, K, H] with equal B..., Tk and K; got query "
            f"{query.shape}, key {key.shape}, value {value.shape}"
        )
    if query.shape[-2] % key.shape[-2]:
        raise ValueError(
            f"the query's heads N must be a multiple of the key/value heads K (grouped-query attention); got query "
            f"{query.shape} and key {key.shape}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"query and key must have the same head dim; got {query.shape} and {key.shape}")
    batch, (tq, n), tk = query.shape[:-3], query.shape[-3:-1], key.shape[-3]
    full = (*batch, n, tq, tk)
    for name, m in (("mask", mask), ("bias", bias)):
        if m is None:
            continue
        ok = m.ndim == len(full) and all(a in (1, b) for a, b in zip(m.shape, full, strict=True))
        if not ok:
            raise ValueError(
                f"{name} of shape {m.shape} does not broadcast to [B..., N, Tq, Tk] = {full} (query {query.shape}, "
                f"key {key.shape})"
            )


def check_mask_dtype(mask: Array | None) -> None:
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = may attend), got dtype {jnp.asarray(mask).dtype}")


def prepare(query, key, value, mask, bias, dropout_rate, dropout_rng, deterministic, scale):
    """The checks and defaults of `scaled_dot_product_attention`'s arguments, shared by every kernel: returns
    (query, key, value, mask, bias, scale, rate) as arrays, scale defaulting to 1/sqrt(H) and rate 0 unless dropout
    is on."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    mask = None if mask is None else jnp.asarray(mask)
    bias = None if bias is None else jnp.asarray(bias)
    check_shapes(query, key, value, mask, bias)
    check_mask_dtype(mask)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    use_dropout = dropout_rate > 0.0 and not deterministic
    if use_dropout and dropout_rng is None:
        raise ValueError("dropout_rng is required when dropout_rate > 0 and deterministic is False")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return query, key, value, mask, bias, scale, dropout_rate if use_dropout else 0.0


def repeat_kv(key: Array, value: Array, num_heads: int) -> tuple[Array, Array]:
    """Grouped key/value `[B..., Tk, K, H]` → `[B..., Tk, N, H]`, head k repeated for query heads k*G .. k*G+G-1
    (G = N/K), for kernels that need one key/value head per query head; a no-op when K = N. The gradient of the
    repeat sums over each group."""
    groups = num_heads // key.shape[-2]
    if groups == 1:
        return key, value
    return jnp.repeat(key, groups, axis=-2), jnp.repeat(value, groups, axis=-2)


def split_qkv(qkv: Array) -> tuple[Array, Array, Array]:
    """[B..., T, 3, N, H] → q, k, v, each [B..., T, N, H]."""
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def acc_dtype(dtype: Dtype) -> Dtype:
    """float32 for half-precision inputs (softmax stability), the input's own dtype for float32/float64."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def flat_mask(mask: Array | None, batch: tuple[int, ...]) -> Array | None:
    """[B..., N|1, Tq|1, Tk] (batch dims possibly 1) → [B|1, N|1, Tq|1, Tk]."""
    if mask is None:
        return None
    if math.prod(mask.shape[:-3]) not in (1, math.prod(batch)):  # batch dims that broadcast only partly
        mask = jnp.broadcast_to(mask, (*batch, *mask.shape[-3:]))
    return mask.reshape(-1, *mask.shape[-3:])


def single_device() -> bool:
    """Whether the process has one device. With several, kernels avoid what XLA cannot partition (a custom call, a
    loop over blocks of a batch-sharded axis), which under a batch-sharded `jit` would gather the batch."""
    return jax.device_count() == 1


# ------------------------------------------------------------------------------------------------------------------
# Causal and segment masks without a [Tq, Tk] array (`is_causal`, `segment_ids`)
# ------------------------------------------------------------------------------------------------------------------
# Causal is top-left aligned, as in jax.nn.dot_product_attention and torch's scaled_dot_product_attention: query i
# may attend to keys 0..i, whatever Tq and Tk. Segment id 0 is padding: such a query attends to nothing (zero
# output) and such a key is attended by no query.

Segments = tuple[Array, Array]  # (q_segment_ids [B..., Tq], kv_segment_ids [B..., Tk]), int32


def segment_pair(segment_ids, query: Array, key: Array) -> Segments | None:
    """`segment_ids` as given to a kernel (None; one int array [B..., T] when Tq == Tk; or a pair (q [B..., Tq],
    kv [B..., Tk])) → the pair, int32 and broadcast to the query's batch dims B...; a ValueError naming the shapes
    otherwise. query [B..., Tq, N, H], key [B..., Tk, N, H]."""
    if segment_ids is None:
        return None
    batch, tq, tk = query.shape[:-3], query.shape[-3], key.shape[-3]
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids must be one array or a pair (q, kv); got {len(segment_ids)} entries")
        q_seg, kv_seg = segment_ids
    else:
        if tq != tk:
            raise ValueError(
                f"one segment_ids array needs Tq == Tk; got query {query.shape} and key {key.shape}: pass a pair "
                "(q_segment_ids [B..., Tq], kv_segment_ids [B..., Tk])"
            )
        q_seg = kv_seg = segment_ids
    out = []
    for name, s, t in (("q", q_seg, tq), ("kv", kv_seg, tk)):
        s = jnp.asarray(s)
        ok = s.ndim == len(batch) + 1 and s.shape[-1] == t
        ok = ok and all(a in (1, b) for a, b in zip(s.shape[:-1], batch, strict=True))
        if not ok or not jnp.issubdtype(s.dtype, jnp.integer):
            raise ValueError(
                f"{name} segment ids must be integers [B..., {t}] with B... = {batch} (query {query.shape}, key "
                f"{key.shape}); got {s.dtype} {s.shape}"
            )
        out.append(jnp.broadcast_to(s.astype(jnp.int32), (*batch, t)))
    return out[0], out[1]


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
    """[B..., Tq] and [B..., Tk] → bool [B..., 1, Tq, Tk]: same segment, and not segment 0 (padding)."""
    q, kv = q_segment_ids[..., None, :, None], kv_segment_ids[..., None, None, :]
    return (q == kv) & (q != 0)


def causal_mask(tq: int, tk: int) -> Array:
    """bool [1, 1, Tq, Tk], top-left aligned: query i may attend to keys 0..i."""
    return (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None])[None, None]


def dense_mask(mask: Array | None, is_causal: bool, segments: Segments | None, query: Array, key: Array):
    """`mask` AND the causal and segment masks, spelled out at the rank of [B..., N, Tq, Tk] (None if there is
    none): for the kernels that take only a mask, and for the reference, which is the definition."""
    rank, parts = query.ndim, [mask]
    if is_causal:
        parts.append(causal_mask(query.shape[-3], key.shape[-3]))
    if segments is not None:
        parts.append(segment_mask(*segments))
    parts = [p.reshape((1,) * (rank - p.ndim) + p.shape) for p in parts if p is not None]
    if not parts:
        return None
    return functools.reduce(jnp.logical_and, parts)
