"""Scaled dot-product attention, masks, and multi-head attention with a KV cache.

Glossary: B batch (any number of leading dims, written B...), Tq / Tk query / key length, N heads, H head dim,
D model width, F input features.

The attention math and the masks are pure functions, tested on their own; `MultiHeadAttention` only projects,
caches and calls them (DESIGN.md, style 7).

Three implementations compute the same function:
  "xla"        (default) ours: the batch and the queries are cut into blocks whose [N, Tq, Tk] score tensor stays in
               cache; the backward pass recomputes the scores from the saved log-sum-exp (as FlashAttention does)
               instead of storing the [B, N, Tq, Tk] probabilities. See BENCHMARKS.md for why this is faster on CPU.
  "reference"  the textbook softmax(QKᵀ/√H)V with autodiff; used for `bias` and `return_weights`.
  "jax"        `jax.nn.dot_product_attention` (XLA on CPU, cuDNN where available; "xla" when value's head dim differs
               from the query's); "cudnn" forces cuDNN (GPU only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from seqjax.nn import _native

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

IMPLEMENTATIONS = ("xla", "reference", "jax", "cudnn")

# Size of one block's score tensor [b, N, q, Tk] in float32 elements. 2**19 (2 MiB) measured best on the 2-core CPU
# (BENCHMARKS.md); anything from 2**18 to 2**21 is within a few percent.
DEFAULT_BLOCK_ELEMENTS = 2**19


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def causal_mask(length: int) -> Array:
    """Lower-triangular mask: query t may attend to keys 0..t.

    Returns:
      bool `[1, 1, length, length]`, True = may attend.
    """
    if length < 1:
        raise ValueError(f"causal_mask: length must be >= 1, got {length}")
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(q_valid: Array, k_valid: Array | None = None) -> Array:
    """Mask from per-position validity flags.

    Args:
      q_valid: bool `[B, Tq]`, True for real (non-padding) query positions.
      k_valid: bool `[B, Tk]`; defaults to `q_valid` (self-attention).

    Returns:
      bool `[B, 1, Tq, Tk]`: True where both the query and the key are valid. Rows of padding queries are fully
      masked, so attention returns zeros there.
    """
    k_valid = q_valid if k_valid is None else k_valid
    q_valid, k_valid = jnp.asarray(q_valid, bool), jnp.asarray(k_valid, bool)
    if q_valid.ndim != 2 or k_valid.ndim != 2 or q_valid.shape[0] != k_valid.shape[0]:
        raise ValueError(
            f"padding_mask expects q_valid [B, Tq] and k_valid [B, Tk] with the same B; got {q_valid.shape} and "
            f"{k_valid.shape}"
        )
    return q_valid[:, None, :, None] & k_valid[:, None, None, :]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given masks (broadcasting), ignoring None entries; None if all are None."""
    present = [jnp.asarray(m, bool) for m in masks if m is not None]
    if not present:
        return None
    ndim = {m.ndim for m in present}
    if len(ndim) != 1:
        raise ValueError(f"combine_masks: masks must have the same rank, got shapes {[m.shape for m in present]}")
    return functools.reduce(jnp.logical_and, present)


# ----------------------------------------------------------------------------------------------------------------
# Scaled dot-product attention
# ----------------------------------------------------------------------------------------------------------------


def _check_shapes(query: Array, key: Array, value: Array, mask: Array | None, bias: Array | None) -> None:
    if query.ndim < 3:
        raise ValueError(f"query must be [B..., Tq, N, H] (rank >= 3), got shape {query.shape}")
    if key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            f"query, key and value must have the same rank; got query {query.shape}, key {key.shape}, "
            f"value {value.shape}"
        )
    if key.shape != value.shape[:-1] + key.shape[-1:] or key.shape[:-3] != query.shape[:-3]:
        raise ValueError(
            f"expected query [B..., Tq, N, H] and key/value [B..., Tk, N, H] with equal B..., Tk and N; got query "
            f"{query.shape}, key {key.shape}, value {value.shape}"
        )
    if key.shape[-2] != query.shape[-2]:
        raise ValueError(f"query and key must have the same number of heads; got {query.shape} and {key.shape}")
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


def _fits_one_block(b: int, n: int, tq: int, tk: int, block_elements: int) -> bool:
    """A problem whose whole score tensor fits one block gains nothing from blocking, and there storing the
    probabilities for the backward pass is cheaper than recomputing them (BENCHMARKS.md): "xla" computes it plainly."""
    return b * n * tq * tk <= block_elements


def _check_mask_dtype(mask: Array | None) -> None:
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = may attend), got dtype {jnp.asarray(mask).dtype}")


def _acc_dtype(dtype: Dtype) -> Dtype:
    """float32 for half-precision inputs (softmax stability), the input's own dtype for float32/float64."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _masked_softmax(logits: Array, mask: Array | None) -> Array:
    """Softmax over the last axis; masked entries get 0 and a fully masked row is all zeros (no NaN)."""
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(s > 0, s, 1.0)


def _dropout(weights: Array, rate: float, rng: Array) -> Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), jnp.zeros((), weights.dtype))


def _reference_attention(q, k, v, mask, bias, scale, dropout_rate, dropout_rng, precision):
    """softmax(q kᵀ·scale + bias) v with autodiff; returns (out [B..., Tq, N, H], weights [B..., N, Tq, Tk])."""
    acc = _acc_dtype(q.dtype)
    logits = jnp.einsum("...qnh,...knh->...nqk", q, k, precision=precision, preferred_element_type=acc)
    logits = logits * jnp.asarray(scale, acc)
    if bias is not None:
        logits = logits + bias.astype(acc)
    weights = _masked_softmax(logits, mask)
    probs = weights if dropout_rate == 0.0 else _dropout(weights, dropout_rate, dropout_rng)
    out = jnp.einsum("...nqk,...knh->...qnh", probs.astype(v.dtype), v, precision=precision)
    return out, weights


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    return next(d for d in range(cap, 0, -1) if n % d == 0)


def _block_sizes(b: int, n: int, tq: int, tk: int, block_elements: int, split_batch: bool = True) -> tuple[int, int]:
    """(batch block, query block) so that one block's scores [bb, N, bq, Tk] hold about `block_elements` floats.
    With split_batch=False every block holds the whole batch and blocks run over queries only: used when the process
    has several devices, since a loop over blocks of a batch-sharded axis makes XLA gather the operands onto every
    device."""
    per_row = n * tk
    if not split_batch:
        bq = tq if b * tq * per_row <= block_elements else max(8, block_elements // (b * per_row))
        return b, min(bq, tq)
    bq = tq if tq * per_row <= block_elements else max(8, block_elements // per_row)
    bq = min(bq, tq)
    bb = _largest_divisor_at_most(b, block_elements // max(1, bq * per_row)) if bq == tq else 1
    return bb, bq


class _Folded(NamedTuple):
    """An array cut into blocks: `x[i]` is block i = ib * nq + iq, with nb (nq) 1 where the array broadcasts."""

    x: Array
    nb: int
    nq: int
    squeezed: bool = False  # blocks of one batch row are stored without that axis (see _fold)

    def take(self, ib, iq) -> Array:
        block = self.x[(ib if self.nb > 1 else 0) * self.nq + (iq if self.nq > 1 else 0)]
        return block[None] if self.squeezed else block


def _fold(x: Array, b: int, bb: int, tq_axis: int | None, bq: int) -> _Folded:
    """[B|1, ...] with the full query axis at `tq_axis` (None: no query axis, or a broadcast one) → blocks
    [nb * nq, bb, ..., bq, ...]. Without query blocking this is a pure reshape, which XLA keeps copy-free."""
    x = jnp.asarray(x)  # cotangents may arrive as numpy arrays, which cannot be indexed by a traced block id
    nb = x.shape[0] // bb if x.shape[0] == b else 1
    if tq_axis is None or x.shape[tq_axis] == bq:
        if x.shape[0] == nb:  # a size-1 block axis makes XLA pick a layout that costs a copy; leave it out
            return _Folded(x, nb, 1, squeezed=True)
        return _Folded(x.reshape(nb, x.shape[0] // nb, *x.shape[1:]), nb, 1)
    x = x.reshape(nb, x.shape[0] // nb, *x.shape[1:])  # [nb, bb|1, ...]
    ax = tq_axis + 1
    nq = x.shape[ax] // bq
    x = x.reshape(*x.shape[:ax], nq, bq, *x.shape[ax + 1 :])
    x = jnp.moveaxis(x, ax, 1)  # [nb, nq, bb, ..., bq, ...]
    return _Folded(x.reshape(nb * nq, *x.shape[2:]), nb, nq)


def _unfold(x: Array, nb: int, nq: int, tq_axis: int) -> Array:
    """Inverse of `_fold` for per-block results [nb * nq, bb, ..., bq, ...] → [B, ..., Tq, ...]."""
    if nq == 1:
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # a no-op reshape when bb == 1
    x = x.reshape(nb, nq, *x.shape[1:])
    ax = tq_axis + 1
    x = jnp.moveaxis(x, 1, ax)  # [nb, bb, ..., nq, bq, ...]
    x = x.reshape(*x.shape[:ax], x.shape[ax] * x.shape[ax + 1], *x.shape[ax + 2 :])
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _heads_major(x: Array) -> Array:
    """[b, T, N, H] <-> [b, N, T, H]."""
    return jnp.swapaxes(x, 1, 2)


def _forward_block(qb, kb, vb, mask_b, keep, precision, heads_major=False):
    """One block: q [bb, bq, N, H] (already scaled), k/v [bb, Tk, N, H], mask broadcastable to [bb, N, bq, Tk],
    keep (dropout) None or bool [bb, N, bq, Tk]. Returns (out [bb, bq, N, H], lse [bb, N, bq]).

    The block is first copied heads-major ([bb, N, T, H]): XLA's CPU dot is about 2x faster on that layout than on
    [bb, T, N, H] with the transposes left implicit (BENCHMARKS.md)."""
    acc = _acc_dtype(qb.dtype)
    if not heads_major:
        qb, kb, vb = _heads_major(qb), _heads_major(kb), _heads_major(vb)
    s = jnp.einsum("bnqh,bnkh->bnqk", qb, kb, precision=precision, preferred_element_type=acc)
    if mask_b is not None:
        s = jnp.where(mask_b, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)  # noqa: E741  [bb, N, bq, 1]
    if keep is not None:
        e = jnp.where(keep[0], e, 0.0) * jnp.asarray(keep[1], acc)
    o = jnp.einsum("bnqk,bnkh->bnqh", e.astype(vb.dtype), vb, precision=precision, preferred_element_type=acc)
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)  # [bb, N, bq, 1]
    o = _heads_major(o * inv).astype(qb.dtype)  # [bb, bq, N, H]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)[..., 0]  # [bb, N, bq]
    return o, lse


def _backward_block(qb, kb, vb, dob, lse_b, delta_b, mask_b, keep, precision, heads_major=False):
    """Gradients of one block (shapes as in `_forward_block`; dO like q, lse and delta [bb, N, bq]) → dq, dk, dv.

    Works on transposed scores Sᵀ [bb, N, Tk, bq]: then Pᵀ dO (for dV) and dSᵀ Q (for dK) are plain matmuls and only
    dS K (for dQ) needs an explicit transpose; XLA's CPU dots that contract the lhs's row axis, or more explicit
    [Tk, Tq] transposes, each cost more (BENCHMARKS.md)."""
    acc = _acc_dtype(qb.dtype)
    dob = _heads_major(dob)
    if not heads_major:
        qb, kb, vb = _heads_major(qb), _heads_major(kb), _heads_major(vb)
    st = jnp.einsum("bnkh,bnqh->bnkq", kb, qb, precision=precision, preferred_element_type=acc)
    if mask_b is not None:
        st = jnp.where(jnp.swapaxes(mask_b, -1, -2), st, -jnp.inf)
    pt = jnp.exp(st - lse_b[..., None, :])  # [bb, N, Tk, bq]
    dpt = jnp.einsum("bnkh,bnqh->bnkq", vb, dob, precision=precision, preferred_element_type=acc)
    if keep is not None:
        keep_t, c = jnp.swapaxes(keep[0], -1, -2), jnp.asarray(keep[1], acc)
        pdt = jnp.where(keep_t, pt, 0.0) * c
        dpt = jnp.where(keep_t, dpt, 0.0) * c
    else:
        pdt = pt
    dv = jnp.einsum("bnkq,bnqh->bnkh", pdt.astype(dob.dtype), dob, precision=precision)
    dst = (pt * (dpt - delta_b[..., None, :])).astype(qb.dtype)
    dk = jnp.einsum("bnkq,bnqh->bnkh", dst, qb, precision=precision)
    dq = jnp.einsum("bnqk,bnkh->bnqh", jnp.swapaxes(dst, -1, -2), kb, precision=precision)
    if heads_major:
        return dq, dk, dv
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)


def _keep(rng, block_id, rate, shape):
    """Dropout keep-mask of one block and the 1/(1-rate) scale; None without dropout. Drawn from
    fold_in(rng, block_id), so the backward pass regenerates exactly the forward's mask."""
    if rate == 0.0:
        return None
    return jax.random.bernoulli(jax.random.fold_in(rng, block_id), 1.0 - rate, shape), 1.0 / (1.0 - rate)


def _softmax_delta(dout, out):
    """D_i = sum_h dO_ih O_ih = sum_k P_ik dP_ik: the softmax backward without a second [Tq, Tk] reduction."""
    acc = _acc_dtype(out.dtype)
    return jnp.einsum("bqnh,bqnh->bnq", dout.astype(acc), out.astype(acc))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _blocked_attention(q, k, v, mask, rng, dropout_rate, precision, bb, bq, heads_major):
    return _blocked_fwd(q, k, v, mask, rng, dropout_rate, precision, bb, bq, heads_major)[0]


def _fold_inputs(q, k, v, mask, bb, bq, heads_major):
    """Blocks of q, k, v and the mask, shared by the forward and backward passes; returns (dims, qf, kf, vf, mf) with
    dims = (t_axis, B, Tq, N, Tk)."""
    t_axis = 2 if heads_major else 1
    b, tq, n, tk = q.shape[0], q.shape[t_axis], q.shape[3 - t_axis], k.shape[t_axis]
    qf = _fold(q, b, bb, t_axis, bq)  # [nb * nq, bb, bq, N, H] (or [.., N, bq, H])
    kf, vf = _fold(k, b, bb, None, bq), _fold(v, b, bb, None, bq)  # [nb, bb, Tk, N, H]
    mf = None if mask is None else _fold(mask, b, bb, 2 if mask.shape[2] == tq else None, bq)
    return (t_axis, b, tq, n, tk), qf, kf, vf, mf


def _blocked_fwd(q, k, v, mask, rng, dropout_rate, precision, bb, bq, heads_major):
    """q [B, Tq, N, H] (already scaled), k/v [B, Tk, N, H], mask [B|1, N|1, Tq|1, Tk] or None. With heads_major,
    q/k/v (and their gradients) are [B, N, T, H] instead; the output is [B, Tq, N, H] either way."""
    (_, _, _, n, tk), qf, kf, vf, mf = _fold_inputs(q, k, v, mask, bb, bq, heads_major)
    nb, nq = qf.nb, qf.nq

    def block(i):
        ib, iq = i // nq, i % nq
        keep = _keep(rng, i, dropout_rate, (bb, n, bq, tk))
        m = None if mf is None else mf.take(ib, iq)
        return _forward_block(qf.take(ib, iq), kf.take(ib, iq), vf.take(ib, iq), m, keep, precision, heads_major)

    o, lse = lax.map(block, jnp.arange(nb * nq))
    out = _unfold(o, nb, nq, 1)  # [B, Tq, N, H]
    lse = _unfold(lse, nb, nq, 2)  # [B, N, Tq]
    return out, (q, k, v, mask, rng, out, lse)


def _block_gradients(dropout_rate, precision, bb, bq, heads_major, res, dout):
    """The backward pass's blocks: (t_axis, B, nb, nq, block) with block(ib, iq) -> dq, dk, dv of that block
    ([bb, bq, N, H], or heads-major [bb, N, bq, H], for dq; [bb, Tk, N, H] or [bb, N, Tk, H] for dk and dv)."""
    q, k, v, mask, rng, out, lse = res
    (t_axis, b, _, n, tk), qf, kf, vf, mf = _fold_inputs(q, k, v, mask, bb, bq, heads_major)
    delta = _softmax_delta(dout, out)
    dof = _fold(dout, b, bb, 1, bq)
    lsef, deltaf = _fold(lse, b, bb, 2, bq), _fold(delta, b, bb, 2, bq)  # [nb * nq, bb, N, bq]
    nb, nq = qf.nb, qf.nq

    def block(ib, iq):
        keep = _keep(rng, ib * nq + iq, dropout_rate, (bb, n, bq, tk))
        m = None if mf is None else mf.take(ib, iq)
        blocks = (x.take(ib, iq) for x in (qf, kf, vf, dof, lsef, deltaf))
        return _backward_block(*blocks, m, keep, precision, heads_major)

    return t_axis, b, nb, nq, block


def _blocked_bwd(dropout_rate, precision, bb, bq, heads_major, res, dout):
    k, v = res[1], res[2]
    t_axis, b, nb, nq, block = _block_gradients(dropout_rate, precision, bb, bq, heads_major, res, dout)
    if nq == 1:
        dq, dk, dv = lax.map(lambda ib: block(ib, 0), jnp.arange(nb))
    else:

        def over_queries(ib):
            # dK and dV of one batch block sum over its query blocks.
            def step(carry, iq):
                dq, dk, dv = block(ib, iq)
                return (carry[0] + dk, carry[1] + dv), dq

            zeros = jnp.zeros((bb, *k.shape[1:]), k.dtype), jnp.zeros((bb, *v.shape[1:]), v.dtype)
            (dk, dv), dq = lax.scan(step, zeros, jnp.arange(nq))
            return dq, dk, dv

        dq, dk, dv = lax.map(over_queries, jnp.arange(nb))
        dq = dq.reshape(nb * nq, *dq.shape[2:])
    dq = _unfold(dq, nb, nq, t_axis)
    dk = dk.reshape(b, *dk.shape[2:])
    dv = dv.reshape(b, *dv.shape[2:])
    return dq, dk, dv, None, None


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_self_attention(qkv, mask, rng, dropout_rate, precision, bb):
    return _fused_fwd(qkv, mask, rng, dropout_rate, precision, bb)[0]


def _fused_fwd(qkv, mask, rng, dropout_rate, precision, bb):
    """Self-attention straight from the fused projection qkv [B, T, 3, N, H] (q already scaled), in blocks of `bb`
    whole batch rows (no query blocks). The forward is the blocked kernel on q, k, v sliced heads-major, in the one
    copy that slicing costs anyway. The backward emits d(qkv) in the projection's own layout: each block stacks and
    transposes its small dq, dk, dv in cache, so the loop's output is the gradient, with no [B, N, T, H] dq, dk, dv
    buffers to copy and concatenate afterwards (BENCHMARKS.md)."""
    hm = jnp.moveaxis(qkv, 1, 3)  # [B, 3, N, T, H]
    return _blocked_fwd(hm[:, 0], hm[:, 1], hm[:, 2], mask, rng, dropout_rate, precision, bb, qkv.shape[1], True)


def _fused_bwd(dropout_rate, precision, bb, res, dout):
    t = res[0].shape[2]  # q [B, N, T, H]
    _, b, nb, _, block = _block_gradients(dropout_rate, precision, bb, t, True, res, dout)

    def rows(ib):
        dq, dk, dv = block(ib, 0)  # [bb, N, T, H] each
        return jnp.transpose(jnp.stack([dq, dk, dv], axis=1), (0, 3, 1, 2, 4))  # [bb, T, 3, N, H]

    dqkv = lax.map(rows, jnp.arange(nb))
    return dqkv.reshape(b, *dqkv.shape[2:]), None, None


_fused_self_attention.defvjp(_fused_fwd, _fused_bwd)


NATIVE_MAX_LENGTH = 2048  # the C++ kernel keeps two [T, T] score tiles per thread (32 MB at this length)


def _use_native_attention(qkv: Array, rate: float, length: int) -> bool:
    """Whether self-attention runs seqjax's C++ CPU kernel (`seqjax/nn/_native/attention.cc`; BENCHMARKS.md has
    why): float32, no dropout, at most NATIVE_MAX_LENGTH positions, a CPU backend with a single device, and the
    kernel built. With several devices the XLA kernel runs, since XLA cannot partition the custom call: under a
    batch-sharded `jit` it would gather the whole batch onto every device."""
    return (
        rate == 0.0
        and length <= NATIVE_MAX_LENGTH
        and qkv.dtype == jnp.float32
        and jax.default_backend() == "cpu"
        and _single_device()
        and _native.available()
    )


def _single_device() -> bool:
    return jax.device_count() == 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native_self_attention(qkv, mask, precision):
    """Self-attention without dropout from the fused projection qkv [B, T, 3, N, H] (q already scaled) → [B, T, N, H],
    by the C++ kernel where the program is lowered for a CPU, and by `_qkv_attention_fwd` / `_bwd` elsewhere
    (`lax.platform_dependent`): the same math in plain JAX ops, which the kernel's tests also use as a reference.
    Saves qkv, the kernel's mask, the output and the log-sum-exp of each query's scores."""
    return _native_fwd(qkv, mask, precision)[0]


def _native_mask(mask: Array | None, t: int) -> Array:
    """The kernel's mask: bool [B|1, N|1, T|1, T] (a mask that broadcasts over the keys is spelled out)."""
    if mask is None:
        return jnp.ones((1, 1, 1, t), bool)
    return jnp.broadcast_to(mask.astype(bool), (*mask.shape[:3], t))


def _qkv_attention_fwd(qkv, mask, precision=None):
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


def _qkv_attention_bwd(qkv, mask, out, lse, dout, precision=None):
    """d(qkv) of `_qkv_attention_fwd` from its residuals: P recomputed from the scores and lse, D = rowsum(dO ∘ O)."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = jnp.einsum("bqnh,bknh->bnqk", q, k, precision=precision)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    dp = jnp.einsum("bqnh,bknh->bnqk", dout, v, precision=precision)
    ds = p * (dp - jnp.einsum("bqnh,bqnh->bnq", dout, out)[..., None])
    dq = jnp.einsum("bnqk,bknh->bqnh", ds, k, precision=precision)
    dk = jnp.einsum("bnqk,bqnh->bknh", ds, q, precision=precision)
    dv = jnp.einsum("bnqk,bqnh->bknh", p, dout, precision=precision)
    return jnp.stack([dq, dk, dv], axis=2)


@_native.with_derivatives_of(_qkv_attention_fwd)
def _native_forward_call(qkv, m):
    b, t, _, n, h = qkv.shape
    out = (jax.ShapeDtypeStruct((b, t, n, h), jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
    return tuple(jax.ffi.ffi_call("seqjax_attention_forward", out, vmap_method="sequential")(qkv, m))


@_native.with_derivatives_of(_qkv_attention_bwd)
def _native_backward_call(qkv, m, out, lse, dout):
    result = jax.ShapeDtypeStruct(qkv.shape, jnp.float32)
    return jax.ffi.ffi_call("seqjax_attention_backward", result, vmap_method="sequential")(qkv, m, out, lse, dout)


def _native_fwd(qkv, mask, precision):
    default = functools.partial(_qkv_attention_fwd, precision=precision)
    m = _native_mask(mask, qkv.shape[1])
    out, lse = lax.platform_dependent(qkv, m, cpu=_native_forward_call, default=default)
    return out, (qkv, m, out, lse)


def _native_bwd(precision, res, dout):
    qkv, m, out, lse = res
    default = functools.partial(_qkv_attention_bwd, precision=precision)
    args = (qkv, m, out, lse, jnp.asarray(dout, jnp.float32))
    return lax.platform_dependent(*args, cpu=_native_backward_call, default=default), None


_native_self_attention.defvjp(_native_fwd, _native_bwd)


def scaled_dot_product_attention(
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
    implementation: str = "xla",
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Array | tuple[Array, Array]:
    """Z = softmax(Q Kᵀ · scale + bias) V per head, with masking and dropout on the weights.

    Args:
      query: `[B..., Tq, N, H]`.
      key, value: `[B..., Tk, N, H]`.
      mask: bool, broadcastable to `[B..., N, Tq, Tk]` (same rank), True = may attend. A query whose row is fully
        masked gets a zero output (and zero gradient), never NaN.
      bias: float, broadcastable to `[B..., N, Tq, Tk]`, added to the scaled logits (e.g. relative positions).
      dropout_rate: dropout on the attention weights, applied when `deterministic` is False.
      dropout_rng: PRNG key for that dropout.
      deterministic: no dropout when True.
      return_weights: also return the softmax weights `[B..., N, Tq, Tk]` (float32, before dropout).
      scale: logit scale; default 1/sqrt(H).
      precision: matmul precision.
      implementation: "xla" (blocked, default), "reference", "jax" or "cudnn"; see the module docstring. "xla"
        computes as "reference" when `bias` or `return_weights` is given or when the problem fits one block.
      block_elements: target size of one block's scores for "xla" (a speed knob; the result does not depend on it).

    Returns:
      `[B..., Tq, N, H]` in the dtype of `value`, and the weights when `return_weights`. The logits and the softmax
      are computed in float32 whatever the input dtype.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    mask = None if mask is None else jnp.asarray(mask)
    bias = None if bias is None else jnp.asarray(bias)
    _check_shapes(query, key, value, mask, bias)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check_mask_dtype(mask)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    use_dropout = dropout_rate > 0.0 and not deterministic
    if use_dropout and dropout_rng is None:
        raise ValueError("dropout_rng is required when dropout_rate > 0 and deterministic is False")
    head_dim = query.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    rate = dropout_rate if use_dropout else 0.0

    if implementation == "jax" and value.shape[-1] != head_dim:
        implementation = "xla"  # jax.nn.dot_product_attention needs value's head dim to equal the query's
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU; JAX's backend here is {jax.default_backend()!r}")
    if implementation in ("jax", "cudnn"):
        if rate > 0.0 or return_weights:
            raise ValueError(f"implementation={implementation!r} supports neither dropout nor return_weights")
        return _jax_attention(query, key, value, mask, bias, scale, implementation)

    one_block = _fits_one_block(
        math.prod(query.shape[:-3]), query.shape[-2], query.shape[-3], key.shape[-3], block_elements
    )
    if implementation == "reference" or bias is not None or return_weights or one_block:
        out, weights = _reference_attention(query, key, value, mask, bias, scale, rate, dropout_rng, precision)
        return (out, weights) if return_weights else out

    # Flatten the batch dims, fold the scale into the (smaller) query tensor, and run the blocked kernel.
    batch = query.shape[:-3]
    b, (tq, n, h), tk = math.prod(batch), query.shape[-3:], key.shape[-3]
    q = (query * jnp.asarray(scale, query.dtype)).reshape(b, tq, n, h)
    k, v = key.reshape(b, tk, n, h), value.reshape(b, tk, n, value.shape[-1])
    out = _run_blocked(q, k, v, _flat_mask(mask, batch), rate, dropout_rng, precision, block_elements, False)
    return out.astype(value.dtype).reshape(*batch, tq, n, value.shape[-1])


def _run_blocked(q, k, v, mask, rate, dropout_rng, precision, block_elements, heads_major):
    """The blocked kernel on flat-batch q [B, Tq, N, H] and k/v [B, Tk, N, H] (or [B, N, T, H] with heads_major),
    mask [B|1, N|1, Tq|1, Tk]; pads the queries to a whole number of blocks. Returns [B, Tq, N, H]."""
    t_axis = 2 if heads_major else 1
    b, tq, n, tk = q.shape[0], q.shape[t_axis], q.shape[3 - t_axis], k.shape[t_axis]
    bb, bq = _block_sizes(b, n, tq, tk, block_elements, _single_device())
    pad = (-tq) % bq
    if pad:
        q = jnp.pad(q, [(0, pad) if i == t_axis else (0, 0) for i in range(4)])
        if mask is not None and mask.shape[2] == tq:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)))
    rng = dropout_rng if rate > 0.0 else jax.random.key(0)
    return _blocked_attention(q, k, v, mask, rng, rate, precision, bb, bq, heads_major)[:, :tq]


def _flat_mask(mask: Array | None, batch: tuple[int, ...]) -> Array | None:
    """[B..., N|1, Tq|1, Tk] (batch dims possibly 1) → [B|1, N|1, Tq|1, Tk]."""
    if mask is None:
        return None
    if math.prod(mask.shape[:-3]) not in (1, math.prod(batch)):  # batch dims that broadcast only partly
        mask = jnp.broadcast_to(mask, (*batch, *mask.shape[-3:]))
    return mask.reshape(-1, *mask.shape[-3:])


def _jax_attention(query, key, value, mask, bias, scale, implementation):
    batch = query.shape[:-3]
    flat = lambda x: x.reshape(-1, *x.shape[-3:])
    full = (math.prod(batch), query.shape[-2], query.shape[-3], key.shape[-3])
    m = None if mask is None else jnp.broadcast_to(mask, (*batch, *mask.shape[-3:])).reshape(-1, *mask.shape[-3:])
    m = None if m is None else jnp.broadcast_to(m, full)
    bi = None if bias is None else jnp.broadcast_to(bias, (*batch, *bias.shape[-3:])).reshape(-1, *bias.shape[-3:])
    out = jax.nn.dot_product_attention(
        flat(query),
        flat(key),
        flat(value),
        bias=bi,
        mask=m,
        scale=scale,
        implementation="cudnn" if implementation == "cudnn" else None,
    )
    if m is not None:  # fully masked rows: zeros, as the other implementations return
        any_valid = jnp.any(m, axis=-1)  # [B, N, Tq]
        out = jnp.where(jnp.swapaxes(any_valid, 1, 2)[..., None], out, jnp.zeros((), out.dtype))
    return out.reshape(*batch, *out.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------------------------------------------


class _Weights(nn.Module):
    """Holds one projection's kernel and bias, so parameter names match flax's MultiHeadDotProductAttention
    ({"query": {"kernel", "bias"}, ...}) while the parent fuses the matmuls."""

    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    use_bias: bool
    kernel_init: Initializer
    bias_init: Initializer
    param_dtype: Dtype

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        kernel = self.param("kernel", self.kernel_init, self.kernel_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, self.bias_shape, self.param_dtype) if self.use_bias else None
        return kernel, bias


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project to N heads, attend, project back.

    Parameters have the names and shapes of flax's `nn.MultiHeadDotProductAttention` (query/key/value kernels
    `[F, N, H]`, biases `[N, H]`, out kernel `[N, H, D]`), so weights move between the two unchanged.

    Attributes:
      num_heads: N.
      qkv_features: N*H; defaults to the query input's width.
      out_features: D; defaults to the query input's width.
      dropout_rate: dropout on the attention weights.
      use_bias: biases on the four projections.
      dtype: compute dtype (default: inferred from inputs and params). Logits and softmax stay in float32.
      param_dtype: storage dtype of the parameters.
      precision: matmul precision.
      kernel_init, bias_init, out_kernel_init: initialisers (out_kernel_init defaults to kernel_init).
      decode: incremental decoding of self-attention with a KV cache in the "cache" collection. `init` with inputs
        `[B, L, F]` creates a cache for L positions; each later call with `[B, T, F]` (T >= 1, T = the whole prompt
        for a one-pass prefill) writes T positions and attends causally over everything cached so far.
      implementation: see `scaled_dot_product_attention`.
      fuse_qkv: compute the query/key/value projections as one matmul (same parameters, same function; faster).

    The attention weights `[B..., N, Tq, Tk]` are sown into "intermediates" as "attention_weights" when that
    collection is mutable (`apply(..., mutable=["intermediates"])`), for visualisation.
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: lax.PrecisionLike = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    out_kernel_init: Initializer | None = None
    decode: bool = False
    implementation: str = "xla"
    fuse_qkv: bool = True

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Args:
          inputs_q: `[B..., Tq, F]`.
          inputs_kv: `[B..., Tk, F']` for cross-attention; None for self-attention.
          mask: bool broadcastable to `[B..., N, Tq, Tk]`, True = may attend.
          deterministic: disables dropout.

        Returns:
          `[B..., Tq, D]`.
        """
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        if inputs_q.ndim < 2 or inputs_kv.ndim != inputs_q.ndim or inputs_kv.shape[:-2] != inputs_q.shape[:-2]:
            raise ValueError(
                f"MultiHeadAttention expects inputs_q [B..., Tq, F] and inputs_kv [B..., Tk, F'] with the same "
                f"batch dims; got {inputs_q.shape} and {inputs_kv.shape}"
            )
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(
                f"qkv_features ({qkv_features}) must be divisible by num_heads ({self.num_heads}); inputs_q has "
                f"shape {inputs_q.shape}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.decode and not self_attention:
            raise ValueError("decode=True caches self-attention only; call it without inputs_kv")
        out_features = self.out_features or inputs_q.shape[-1]
        n, h = self.num_heads, qkv_features // self.num_heads

        def weights(name, fan_in):
            return _Weights(
                (fan_in, n, h), (n, h), self.use_bias, self.kernel_init, self.bias_init, self.param_dtype, name=name
            )()

        wq = weights("query", inputs_q.shape[-1])
        wk = weights("key", inputs_kv.shape[-1])
        wv = weights("value", inputs_kv.shape[-1])
        wo = _Weights(
            (n, h, out_features),
            (out_features,),
            self.use_bias,
            self.out_kernel_init or self.kernel_init,
            self.bias_init,
            self.param_dtype,
            name="out",
        )()

        # The 1/sqrt(H) logit scale is folded into the query kernel: [F, N*H] work instead of [B, T, N*H].
        scale = 1.0 / math.sqrt(h)
        wq = (
            wq[0] * jnp.asarray(scale, wq[0].dtype),
            None if wq[1] is None else wq[1] * jnp.asarray(scale, wq[1].dtype),
        )
        dtype = self.dtype or jnp.result_type(inputs_q, inputs_kv, wq[0])
        inputs_q, inputs_kv = inputs_q.astype(dtype), inputs_kv.astype(dtype)
        rate = self.dropout_rate if not deterministic else 0.0
        dropout_rng = self.make_rng("dropout") if rate > 0.0 else None
        want_weights = self.is_mutable_collection("intermediates")
        if self_attention and self.fuse_qkv:
            qkv = _project(inputs_q, [wq, wk, wv], dtype, self.precision)  # [B..., T, 3, N, H]
            *batch, t = inputs_q.shape[:-1]
            b = math.prod(batch)
            if (
                self.implementation == "xla"
                and not (self.decode or want_weights)
                and not _fits_one_block(b, n, t, t, DEFAULT_BLOCK_ELEMENTS)
            ):
                # Slice q, k, v heads-major ([B, N, T, H]) in the one copy that slicing costs anyway, so that the
                # kernel's blocks need no transposes of their own (BENCHMARKS.md).
                _check_shapes(*(qkv[..., i, :, :] for i in range(3)), mask, None)
                _check_mask_dtype(mask)
                flat_mask = _flat_mask(None if mask is None else jnp.asarray(mask), tuple(batch))
                bb, bq = _block_sizes(b, n, t, t, DEFAULT_BLOCK_ELEMENTS, _single_device())
                if _use_native_attention(qkv, rate, t):
                    out = _native_self_attention(qkv.reshape(b, t, 3, n, h), flat_mask, self.precision)
                elif bq == t:  # whole batch rows per block: the backward emits d(qkv) directly
                    rng = dropout_rng if rate > 0.0 else jax.random.key(0)
                    out = _fused_self_attention(qkv.reshape(b, t, 3, n, h), flat_mask, rng, rate, self.precision, bb)
                else:
                    qkv_hm = jnp.moveaxis(qkv.reshape(b, t, 3, n, h), 1, 3)  # [B, 3, N, T, H]
                    q, k, v = qkv_hm[:, 0], qkv_hm[:, 1], qkv_hm[:, 2]
                    out = _run_blocked(
                        q, k, v, flat_mask, rate, dropout_rng, self.precision, DEFAULT_BLOCK_ELEMENTS, True
                    )
                return self._out(out.reshape(*batch, t, n, h), wo, dtype)
            query, key, value = (qkv[..., i, :, :] for i in range(3))
        elif self.fuse_qkv:
            query = _project(inputs_q, [wq], dtype, self.precision)[..., 0, :, :]
            kv = _project(inputs_kv, [wk, wv], dtype, self.precision)
            key, value = kv[..., 0, :, :], kv[..., 1, :, :]
        else:
            query, key, value = (
                _project(x, [w], dtype, self.precision)[..., 0, :, :]
                for x, w in ((inputs_q, wq), (inputs_kv, wk), (inputs_kv, wv))
            )

        if self.decode:
            key, value, mask = self._update_cache(key, value, mask)

        result = scaled_dot_product_attention(
            query,
            key,
            value,
            mask,
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            deterministic=rate == 0.0,
            return_weights=want_weights,
            scale=1.0,
            precision=self.precision,
            implementation=self.implementation,
        )
        if want_weights:
            result, attn = result
            self.sow("intermediates", "attention_weights", attn)
        return self._out(result, wo, dtype)

    def _out(self, result: Array, wo: tuple[Array, Array | None], dtype: Dtype) -> Array:
        """[B..., T, N, H] → [B..., T, D]."""
        kernel, bias = wo
        out = jnp.einsum("...tnh,nhd->...td", result, kernel.astype(dtype), precision=self.precision)
        if bias is not None:
            out = out + bias.astype(dtype)
        return out

    def _update_cache(self, key: Array, value: Array, mask: Array | None):
        """Writes this call's keys/values into the cache; returns the whole cache and the causal mask over it."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not initialized:  # init: the cache is created with the init input's length; the pass itself is causal
            return key, value, combine_masks(mask, causal_mask(key.shape[-3]))
        *batch, max_len, n, h = cached_key.value.shape
        t = key.shape[-3]
        if tuple(batch) != key.shape[:-3] or (n, h) != key.shape[-2:] or t > max_len:
            raise ValueError(
                f"decode: new keys {key.shape} do not fit the cache {cached_key.value.shape} (batch, heads and "
                f"head dim must match and at most {max_len} positions fit)"
            )
        index = cache_index.value
        start = (0,) * len(batch) + (index, 0, 0)
        cached_key.value = lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = lax.dynamic_update_slice(cached_value.value, value, start)
        cache_index.value = index + t
        # New query i sits at position index + i and sees cached positions <= index + i.
        q_pos = index + jnp.arange(t)
        decode_mask = (jnp.arange(max_len)[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, L]
        decode_mask = decode_mask.reshape((1,) * len(batch) + decode_mask.shape[1:])
        return cached_key.value, cached_value.value, combine_masks(mask, decode_mask)


def _project(x: Array, weights: Sequence[tuple[Array, Array | None]], dtype: Dtype, precision) -> Array:
    """x [B..., T, F] times k kernels [F, N, H] as one [B*T, F] x [F, k*N*H] matmul → [B..., T, k, N, H]."""
    f, n, h = weights[0][0].shape
    kernel = jnp.stack([w for w, _ in weights], axis=1).astype(dtype)  # [F, k, N, H]
    y = jnp.dot(x.reshape(-1, f), kernel.reshape(f, -1), precision=precision)  # [B*T, k*N*H]
    if weights[0][1] is not None:
        y = y + jnp.stack([b for _, b in weights]).astype(dtype).reshape(-1)
    return y.reshape(*x.shape[:-1], len(weights), n, h)  # [B..., T, k, N, H]
