"""Attention masks: pure functions, tested on their own (DESIGN.md, style 7).

Glossary: B batch, Tq / Tk query / key length. Every mask is boolean, True = may attend, and broadcasts to
`[B..., N, Tq, Tk]`. For long sequences prefer `is_causal=True` and `segment_ids` on `scaled_dot_product_attention` /
`MultiHeadAttention`, which the kernels compute inside their blocks instead of building these `[Tq, Tk]` arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqjax.kernels import common

Array = jax.Array


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


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array | None = None) -> Array:
    """Mask of packed sequences: a query attends only to keys of its own segment; segment 0 is padding.

    Args:
      q_segment_ids: int `[B, Tq]` (1, 2, ... per packed sequence, 0 for padding, as `seqjax.data.pipeline.pack`
        returns them).
      kv_segment_ids: int `[B, Tk]`; defaults to `q_segment_ids` (self-attention).

    Returns:
      bool `[B, 1, Tq, Tk]`: True where the ids are equal and not 0. Rows of padding queries are fully masked, so
      attention returns zeros there. `segment_ids=` on the attention functions computes the same without the array.
    """
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    q, kv = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
    if q.ndim != 2 or kv.ndim != 2 or q.shape[0] != kv.shape[0]:
        raise ValueError(
            f"segment_mask expects q_segment_ids [B, Tq] and kv_segment_ids [B, Tk] with the same B; got {q.shape} "
            f"and {kv.shape}"
        )
    return common.segment_mask(q, kv)


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given masks (broadcasting), ignoring None entries; None if all are None."""
    present = [jnp.asarray(m, bool) for m in masks if m is not None]
    if not present:
        return None
    ndim = {m.ndim for m in present}
    if len(ndim) != 1:
        raise ValueError(f"combine_masks: masks must have the same rank, got shapes {[m.shape for m in present]}")
    return functools.reduce(jnp.logical_and, present)
