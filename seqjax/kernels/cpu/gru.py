"""The C++ GRU kernel (`gru.cc`): `fused_gru`'s function in float32 on a one-device CPU backend (`applies`, the
LSTM kernel's), forward (with and without residuals) and backward over the whole sequence.

Glossary: B batch, T time, F input features, H hidden features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqjax.kernels.cpu import ffi
from seqjax.kernels.cpu.lstm import applies
from seqjax.kernels.gru import fused_gru_backward, gru_scan

Array = jax.Array
f32 = ffi.f32
__all__ = ["applies", "gru"]


def reference_forward(xs, h0, w_ih, w_hh, b_ih, b_hh, precision=None):
    """The kernel's forward in JAX ops, time-major: (hs [T, B, H], h_T, acts [T, B, 4H] = r, z, n, hn)."""
    h, (r, z, n, hn, hs) = gru_scan(jnp.swapaxes(xs, 0, 1), h0, w_ih, w_hh, b_ih, b_hh, precision)
    return hs, h, jnp.concatenate([r, z, n, hn], -1)


def reference_inference(xs, h0, w_ih, w_hh, b_ih, b_hh, precision=None):
    return reference_forward(xs, h0, w_ih, w_hh, b_ih, b_hh, precision)[:2]


def reference_backward(xs, h0, w_ih, w_hh, hs, acts, dys, dh, precision=None):
    """The kernel's backward in JAX ops: (dxs [T, B, F], dh0, dw_ih, dw_hh, db_ih, db_hh), by `fused_gru`'s."""
    zero = jnp.zeros(w_hh.shape[1], acts.dtype)
    res = (jnp.swapaxes(xs, 0, 1), h0, w_ih, w_hh, zero, zero, (*jnp.split(acts, 4, axis=-1), hs))
    dx, *rest = fused_gru_backward(precision, res, (jnp.swapaxes(dys, 0, 1), dh))
    return (jnp.swapaxes(dx, 0, 1), *rest)


def _state_shapes(xs, w_hh):
    (t, bsz, _), hdim = xs.shape, w_hh.shape[0]
    return f32(t, bsz, hdim), f32(bsz, hdim)


_forward = ffi.kernel(
    "seqjax_gru_forward",
    reference_forward,
    lambda xs, h0, w_ih, w_hh, *_: (*_state_shapes(xs, w_hh), f32(*xs.shape[:2], 4 * w_hh.shape[0])),
)
_inference = ffi.kernel(
    "seqjax_gru_inference", reference_inference, lambda xs, h0, w_ih, w_hh, *_: _state_shapes(xs, w_hh)
)
_backward = ffi.kernel(
    "seqjax_gru_backward",
    reference_backward,
    lambda xs, h0, w_ih, w_hh, *_: (
        f32(*xs.shape),
        f32(*h0.shape),
        f32(*w_ih.shape),
        f32(*w_hh.shape),
        f32(w_hh.shape[1]),
        f32(w_hh.shape[1]),
    ),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gru(x, h0, w_ih, w_hh, b_ih, b_hh, precision=None):
    """`fused_gru` for float32 (h0 `[B, H]`), as `lstm` is `fused_lstm`."""
    hs, h = _inference(jnp.swapaxes(x, 0, 1), h0, w_ih, w_hh, b_ih, b_hh, precision=precision)
    return jnp.swapaxes(hs, 0, 1), h


def _fwd(x, h0, w_ih, w_hh, b_ih, b_hh, precision):
    args = (jnp.swapaxes(x, 0, 1), h0, w_ih, w_hh, b_ih, b_hh)
    hs, h, acts = _forward(*args, precision=precision)
    return (jnp.swapaxes(hs, 0, 1), h), (*args[:4], hs, acts)


def _bwd(precision, res, cotangents):
    dys, dh = cotangents
    args = (*res, jnp.swapaxes(dys, 0, 1).astype(jnp.float32), dh.astype(jnp.float32))
    dxs, *rest = _backward(*args, precision=precision)
    return (jnp.swapaxes(dxs, 0, 1), *rest)


gru.defvjp(_fwd, _bwd)
