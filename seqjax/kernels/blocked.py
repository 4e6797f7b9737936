"""The blocked attention kernel (seqjax's own, in JAX ops; the default on CPU where the C++ kernel does not apply).

The batch and the queries are cut into blocks whose [N, Tq, Tk] score tensor stays in cache; the backward pass
recomputes the scores from the saved log-sum-exp (as FlashAttention does) instead of storing the [B, N, Tq, Tk]
probabilities. BENCHMARKS.md has why this is faster on CPU. Where blocking gains nothing (the whole score tensor
fits one block) or the call needs `bias` or the weights, it computes as `reference`.

Glossary: B batch (B...), Tq / Tk query / key length, N heads, H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.kernels import common, reference

Array = jax.Array

# Size of one block's score tensor [b, N, q, Tk] in float32 elements. 2**19 (2 MiB) measured best on the 2-core CPU
# (BENCHMARKS.md); anything from 2**18 to 2**21 is within a few percent.
DEFAULT_BLOCK_ELEMENTS = 2**19


def fits_one_block(b: int, n: int, tq: int, tk: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> bool:
    """A problem whose whole score tensor fits one block gains nothing from blocking, and there storing the
    probabilities for the backward pass is cheaper than recomputing them (BENCHMARKS.md): it is computed plainly."""
    return b * n * tq * tk <= block_elements


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    return next(d for d in range(cap, 0, -1) if n % d == 0)


def block_sizes(b: int, n: int, tq: int, tk: int, block_elements: int, split_batch: bool = True) -> tuple[int, int]:
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
    acc = common.acc_dtype(qb.dtype)
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
    acc = common.acc_dtype(qb.dtype)
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
    acc = common.acc_dtype(out.dtype)
    return jnp.einsum("bqnh,bqnh->bnq", dout.astype(acc), out.astype(acc))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _blocked_attention(q, k, v, mask, segs, rng, dropout_rate, precision, bb, bq, heads_major, causal):
    return _blocked_fwd(q, k, v, mask, segs, rng, dropout_rate, precision, bb, bq, heads_major, causal)[0]


class _Masks(NamedTuple):
    """What masks the blocks: the folded mask (or None), causality, and the folded segment ids (or None): q
    [nb * nq, bb, bq], kv [nb, bb, Tk]."""

    mask: _Folded | None
    causal: bool
    q_seg: _Folded | None
    kv_seg: _Folded | None

    def block(self, ib, iq, bq: int, tk: int) -> Array | None:
        """The mask of block (ib, iq), broadcastable to [bb, N, bq, Tk], computed from iota and the block's segment
        ids: no [Tq, Tk] array is built for `is_causal` or `segment_ids`."""
        parts = [] if self.mask is None else [self.mask.take(ib, iq)]
        if self.causal:  # top-left aligned: query i sees keys 0..i
            q_pos = iq * bq + lax.broadcasted_iota(jnp.int32, (bq, tk), 0)
            parts.append((lax.broadcasted_iota(jnp.int32, (bq, tk), 1) <= q_pos)[None, None])
        if self.q_seg is not None:
            qs, ks = self.q_seg.take(ib, iq)[:, :, None], self.kv_seg.take(ib, iq)[:, None, :]  # [bb, bq, Tk]
            parts.append(((qs == ks) & (qs != 0))[:, None])
        return functools.reduce(jnp.logical_and, parts) if parts else None


def _fold_inputs(q, k, v, mask, segs, causal, bb, bq, heads_major):
    """Blocks of q, k, v and the masks, shared by the forward and backward passes; returns (dims, qf, kf, vf, masks)
    with dims = (t_axis, B, Tq, N, Tk)."""
    t_axis = 2 if heads_major else 1
    b, tq, n, tk = q.shape[0], q.shape[t_axis], q.shape[3 - t_axis], k.shape[t_axis]
    qf = _fold(q, b, bb, t_axis, bq)  # [nb * nq, bb, bq, N, H] (or [.., N, bq, H])
    kf, vf = _fold(k, b, bb, None, bq), _fold(v, b, bb, None, bq)  # [nb, bb, Tk, N, H]
    mf = None if mask is None else _fold(mask, b, bb, 2 if mask.shape[2] == tq else None, bq)
    q_seg, kv_seg = (None, None) if segs is None else (_fold(segs[0], b, bb, 1, bq), _fold(segs[1], b, bb, None, bq))
    return (t_axis, b, tq, n, tk), qf, kf, vf, _Masks(mf, causal, q_seg, kv_seg)


def _blocked_fwd(q, k, v, mask, segs, rng, dropout_rate, precision, bb, bq, heads_major, causal):
    """q [B, Tq, N, H] (already scaled), k/v [B, Tk, N, H], mask [B|1, N|1, Tq|1, Tk] or None, segs None or segment
    ids (q [B, Tq], kv [B, Tk]) int32, causal a bool. With heads_major, q/k/v (and their gradients) are [B, N, T, H]
    instead; the output is [B, Tq, N, H] either way."""
    (_, _, _, n, tk), qf, kf, vf, masks = _fold_inputs(q, k, v, mask, segs, causal, bb, bq, heads_major)
    nb, nq = qf.nb, qf.nq

    def block(i):
        ib, iq = i // nq, i % nq
        keep = _keep(rng, i, dropout_rate, (bb, n, bq, tk))
        m = masks.block(ib, iq, bq, tk)
        return _forward_block(qf.take(ib, iq), kf.take(ib, iq), vf.take(ib, iq), m, keep, precision, heads_major)

    o, lse = lax.map(block, jnp.arange(nb * nq))
    out = _unfold(o, nb, nq, 1)  # [B, Tq, N, H]
    lse = _unfold(lse, nb, nq, 2)  # [B, N, Tq]
    return out, (q, k, v, mask, segs, rng, out, lse)


def _block_gradients(dropout_rate, precision, bb, bq, heads_major, causal, res, dout):
    """The backward pass's blocks: (t_axis, B, nb, nq, block) with block(ib, iq) -> dq, dk, dv of that block
    ([bb, bq, N, H], or heads-major [bb, N, bq, H], for dq; [bb, Tk, N, H] or [bb, N, Tk, H] for dk and dv)."""
    q, k, v, mask, segs, rng, out, lse = res
    (t_axis, b, _, n, tk), qf, kf, vf, masks = _fold_inputs(q, k, v, mask, segs, causal, bb, bq, heads_major)
    delta = _softmax_delta(dout, out)
    dof = _fold(dout, b, bb, 1, bq)
    lsef, deltaf = _fold(lse, b, bb, 2, bq), _fold(delta, b, bb, 2, bq)  # [nb * nq, bb, N, bq]
    nb, nq = qf.nb, qf.nq

    def block(ib, iq):
        keep = _keep(rng, ib * nq + iq, dropout_rate, (bb, n, bq, tk))
        m = masks.block(ib, iq, bq, tk)
        blocks = (x.take(ib, iq) for x in (qf, kf, vf, dof, lsef, deltaf))
        return _backward_block(*blocks, m, keep, precision, heads_major)

    return t_axis, b, nb, nq, block


def _blocked_bwd(dropout_rate, precision, bb, bq, heads_major, causal, res, dout):
    k, v = res[1], res[2]
    t_axis, b, nb, nq, block = _block_gradients(dropout_rate, precision, bb, bq, heads_major, causal, res, dout)
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
    return dq, dk, dv, None, None, None


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _qkv_attention(qkv, mask, segs, rng, dropout_rate, precision, bb, causal):
    return _qkv_fwd(qkv, mask, segs, rng, dropout_rate, precision, bb, causal)[0]


def _qkv_fwd(qkv, mask, segs, rng, dropout_rate, precision, bb, causal):
    """Self-attention straight from the fused projection qkv [B, T, 3, N, H] (q already scaled), in blocks of `bb`
    whole batch rows (no query blocks). The forward is the blocked kernel on q, k, v sliced heads-major, in the one
    copy that slicing costs anyway. The backward emits d(qkv) in the projection's own layout: each block stacks and
    transposes its small dq, dk, dv in cache, so the loop's output is the gradient, with no [B, N, T, H] dq, dk, dv
    buffers to copy and concatenate afterwards (BENCHMARKS.md)."""
    hm = jnp.moveaxis(qkv, 1, 3)  # [B, 3, N, T, H]
    q, k, v, t = hm[:, 0], hm[:, 1], hm[:, 2], qkv.shape[1]
    return _blocked_fwd(q, k, v, mask, segs, rng, dropout_rate, precision, bb, t, True, causal)


def _qkv_bwd(dropout_rate, precision, bb, causal, res, dout):
    t = res[0].shape[2]  # q [B, N, T, H]
    _, b, nb, _, block = _block_gradients(dropout_rate, precision, bb, t, True, causal, res, dout)

    def rows(ib):
        dq, dk, dv = block(ib, 0)  # [bb, N, T, H] each
        return jnp.transpose(jnp.stack([dq, dk, dv], axis=1), (0, 3, 1, 2, 4))  # [bb, T, 3, N, H]

    dqkv = lax.map(rows, jnp.arange(nb))
    return dqkv.reshape(b, *dqkv.shape[2:]), None, None, None


_qkv_attention.defvjp(_qkv_fwd, _qkv_bwd)


def _run_blocked(q, k, v, mask, segs, causal, rate, dropout_rng, precision, block_elements, heads_major):
    """The blocked kernel on flat-batch q [B, Tq, N, H] and k/v [B, Tk, N, H] (or [B, N, T, H] with heads_major),
    mask [B|1, N|1, Tq|1, Tk], segs None or (q [B, Tq], kv [B, Tk]); pads the queries to a whole number of blocks.
    Returns [B, Tq, N, H]."""
    t_axis = 2 if heads_major else 1
    b, tq, n, tk = q.shape[0], q.shape[t_axis], q.shape[3 - t_axis], k.shape[t_axis]
    bb, bq = block_sizes(b, n, tq, tk, block_elements, common.single_device())
    pad = (-tq) % bq
    if pad:
        q = jnp.pad(q, [(0, pad) if i == t_axis else (0, 0) for i in range(4)])
        if mask is not None and mask.shape[2] == tq:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)))
        if segs is not None:  # padded queries are segment 0: fully masked
            segs = (jnp.pad(segs[0], ((0, 0), (0, pad))), segs[1])
    rng = dropout_rng if rate > 0.0 else jax.random.key(0)
    return _blocked_attention(q, k, v, mask, segs, rng, rate, precision, bb, bq, heads_major, causal)[:, :tq]


def _flat_segments(segs, b: int):
    """Segment ids (q [B..., Tq], kv [B..., Tk]) or None → flat-batch [B, Tq], [B, Tk]."""
    return None if segs is None else tuple(s.reshape(b, s.shape[-1]) for s in segs)


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
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    is_causal: bool = False,
    segment_ids=None,
) -> Array | tuple[Array, Array]:
    """`seqjax.nn.scaled_dot_product_attention` by blocks; `block_elements` is the target size of one block's
    scores (a speed knob: the result does not depend on it). `is_causal` and `segment_ids` are computed inside
    each block (from iota and the block's ids), so no [Tq, Tk] mask is built."""
    q, k, v, mask, bias, scale, rate = common.prepare(
        query, key, value, mask, bias, dropout_rate, dropout_rng, deterministic, scale
    )
    segs = common.segment_pair(segment_ids, q, k)
    batch = q.shape[:-3]
    b, (tq, n, h), tk = math.prod(batch), q.shape[-3:], k.shape[-3]
    if bias is not None or return_weights or fits_one_block(b, n, tq, tk, block_elements):
        mask = common.dense_mask(mask, is_causal, segs, q, k)  # at most one block's size (or asked for)
        out, weights = reference.attention_and_weights(q, k, v, mask, bias, scale, rate, dropout_rng, precision)
        return (out, weights) if return_weights else out
    # The blocks take one key/value head per query head: grouped ones are repeated (their gradients summed back).
    k, v = common.repeat_kv(k, v, n)
    # Flatten the batch dims, fold the scale into the (smaller) query tensor, and run the blocks.
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, tq, n, h)
    k, v = k.reshape(b, tk, n, h), v.reshape(b, tk, n, v.shape[-1])
    mask, segs = common.flat_mask(mask, batch), _flat_segments(segs, b)
    out = _run_blocked(q, k, v, mask, segs, is_causal, rate, dropout_rng, precision, block_elements, False)
    return out.astype(value.dtype).reshape(*batch, tq, n, v.shape[-1])


def self_attention(
    qkv: Array,
    mask: Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    precision: lax.PrecisionLike = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    is_causal: bool = False,
    segment_ids=None,
) -> Array:
    """Self-attention from a fused projection qkv `[B..., T, 3, N, H]` whose q is already scaled → `[B..., T, N, H]`
    (dropout on when `dropout_rate` > 0; `is_causal` and `segment_ids` as in `attention`). Above one block, q, k
    and v are sliced heads-major ([B, N, T, H]) in the one copy that slicing costs anyway, so that the blocks need
    no transposes of their own; with whole batch rows per block the backward pass emits d(qkv) directly
    (BENCHMARKS.md)."""
    *batch, t, _, n, h = qkv.shape
    b = math.prod(batch)
    q, k, v = common.split_qkv(qkv)
    if fits_one_block(b, n, t, t, block_elements):
        return attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                         deterministic=dropout_rate == 0.0, scale=1.0, precision=precision, is_causal=is_causal,
                         segment_ids=segment_ids)  # fmt: skip
    common.check_shapes(q, k, v, mask, None)
    common.check_mask_dtype(mask)
    segs = _flat_segments(common.segment_pair(segment_ids, q, k), b)
    mask = common.flat_mask(None if mask is None else jnp.asarray(mask), tuple(batch))
    bb, bq = block_sizes(b, n, t, t, block_elements, common.single_device())
    if bq == t:  # whole batch rows per block: the backward emits d(qkv) directly
        rng = dropout_rng if dropout_rate > 0.0 else jax.random.key(0)
        out = _qkv_attention(qkv.reshape(b, t, 3, n, h), mask, segs, rng, dropout_rate, precision, bb, is_causal)
    else:
        hm = jnp.moveaxis(qkv.reshape(b, t, 3, n, h), 1, 3)  # [B, 3, N, T, H]
        q, k, v = hm[:, 0], hm[:, 1], hm[:, 2]
        out = _run_blocked(q, k, v, mask, segs, is_causal, dropout_rate, dropout_rng, precision, block_elements, True)
    return out.reshape(*batch, t, n, h)
