"""The C++ LSTM kernel (`lstm.cc`): `fused_lstm`'s function in float32 on a one-device CPU backend (`applies`),
forward (with and without residuals) and backward over the whole sequence.

Glossary: B batch, T time, F input features, H hidden features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqjax.kernels import common, cpu
from seqjax.kernels.cpu import ffi
from seqjax.kernels.lstm import fused_lstm_backward, lstm_scan

Array = jax.Array
f32 = ffi.f32


def applies(*arrays: Array) -> bool:
    """Whether an LSTM or GRU layer on these arrays runs its C++ kernel: all float32, a CPU backend with a single
    device (XLA cannot partition a custom call: under a batch-sharded `jit` it would gather the batch onto every
    device), and the kernels built with their AVX2/FMA micro-kernel (they call no BLAS, but are built into one
    library with the attention kernel, which needs scipy's OpenBLAS to load)."""
    return (
        all(jnp.dtype(a.dtype) == jnp.float32 for a in arrays)
        and jax.default_backend() == "cpu"
        and common.single_device()
        and cpu.available()
        and cpu.recurrent_vectorised()
    )


def reference_forward(xs, c0, h0, w_ih, w_hh, b, precision=None):
    """The kernel's forward in JAX ops, time-major: (hs [T, B, H], c_T, h_T, acts [T, B, 4H], cs [T, B, H])."""
    (c, h), (i, f, g, o, cs, hs) = lstm_scan(jnp.swapaxes(xs, 0, 1), c0, h0, w_ih, w_hh, b, precision)
    return hs, c, h, jnp.concatenate([i, f, g, o], -1), cs


def reference_inference(xs, c0, h0, w_ih, w_hh, b, precision=None):
    return reference_forward(xs, c0, h0, w_ih, w_hh, b, precision)[:3]


def reference_backward(xs, c0, h0, w_ih, w_hh, hs, acts, cs, dys, dc, dh, precision=None):
    """The kernel's backward in JAX ops: (dxs [T, B, F], dc0, dh0, dw_ih, dw_hh, db), by `fused_lstm`'s."""
    gates = jnp.split(acts, 4, axis=-1)
    res = (jnp.swapaxes(xs, 0, 1), c0, h0, w_ih, w_hh, jnp.zeros(acts.shape[-1], acts.dtype), (*gates, cs, hs))
    dx, *rest = fused_lstm_backward(precision, res, (jnp.swapaxes(dys, 0, 1), (dc, dh)))
    return (jnp.swapaxes(dx, 0, 1), *rest)


def _state_shapes(xs, w_hh):
    (t, bsz, _), hdim = xs.shape, w_hh.shape[0]
    return f32(t, bsz, hdim), f32(bsz, hdim), f32(bsz, hdim)


_forward = ffi.kernel(
    "seqjax_lstm_forward",
    reference_forward,
    lambda xs, c0, h0, w_ih, w_hh, b: (
        *_state_shapes(xs, w_hh),
        f32(*xs.shape[:2], 4 * w_hh.shape[0]),
        f32(*xs.shape[:2], w_hh.shape[0]),
    ),
)
_inference = ffi.kernel(
    "seqjax_lstm_inference", reference_inference, lambda xs, c0, h0, w_ih, w_hh, b: _state_shapes(xs, w_hh)
)
_backward = ffi.kernel(
    "seqjax_lstm_backward",
    reference_backward,
    lambda xs, c0, h0, w_ih, w_hh, *_: (
        f32(*xs.shape),
        f32(*c0.shape),
        f32(*h0.shape),
        f32(*w_ih.shape),
        f32(*w_hh.shape),
        f32(w_hh.shape[1]),
    ),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def lstm(x, c0, h0, w_ih, w_hh, b, precision=None):
    """`fused_lstm` for float32 (c0, h0 `[B, H]`): the C++ kernel where the program is lowered for a CPU (where
    `precision` changes nothing for float32), the same math in JAX ops elsewhere. Without differentiation it saves
    nothing."""
    hs, c, h = _inference(jnp.swapaxes(x, 0, 1), c0, h0, w_ih, w_hh, b, precision=precision)
    return jnp.swapaxes(hs, 0, 1), (c, h)


def _fwd(x, c0, h0, w_ih, w_hh, b, precision):
    args = (jnp.swapaxes(x, 0, 1), c0, h0, w_ih, w_hh, b)
    hs, c, h, acts, cs = _forward(*args, precision=precision)
    return (jnp.swapaxes(hs, 0, 1), (c, h)), (*args[:5], hs, acts, cs)


def _bwd(precision, res, cotangents):
    dys, (dc, dh) = cotangents
    args = (*res, jnp.swapaxes(dys, 0, 1).astype(jnp.float32), dc.astype(jnp.float32), dh.astype(jnp.float32))
    dxs, *rest = _backward(*args, precision=precision)
    return (jnp.swapaxes(dxs, 0, 1), *rest)


lstm.defvjp(_fwd, _bwd)
