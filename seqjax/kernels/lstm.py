"""The fused LSTM kernel: an LSTM layer over a whole sequence as one `jax.custom_vjp` with a hand-written backward
pass in JAX ops (what `RNN(LSTMCell)` runs where the C++ kernel does not apply), and the LSTM cell's equations.

Glossary: B batch, T time, F input features, H hidden features; gates in PyTorch's order i, f, g, o.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def lstm_gates(a: Array, c: Array, hdim: int) -> tuple[Array, ...]:
    """LSTMCell's equations from the pre-activation a [B..., 4H]: (i, f, g, o, c', h')."""
    i = jax.nn.sigmoid(a[..., :hdim])
    f = jax.nn.sigmoid(a[..., hdim : 2 * hdim])
    g = jnp.tanh(a[..., 2 * hdim : 3 * hdim])
    o = jax.nn.sigmoid(a[..., 3 * hdim :])
    c = f * c + i * g
    return i, f, g, o, c, o * jnp.tanh(c)


def shifted(first: Array, stacked: Array) -> Array:
    """[first, stacked[0], ..., stacked[T-2]]: the previous step's value at every step of a time-major stack."""
    return jnp.concatenate([first[None].astype(stacked.dtype), stacked[:-1]], 0)


def lstm_scan(x, c0, h0, w_ih, w_hh, b, precision):
    """Time-major scan; returns ((c_T, h_T), (i, f, g, o, c, h)), each of the six stacked over time [T, B, H]."""
    hdim = w_hh.shape[0]

    def step(carry, xt):
        c, h = carry
        a = jnp.matmul(xt, w_ih, precision=precision) + b + jnp.matmul(h, w_hh, precision=precision)
        i, f, g, o, c, h = lstm_gates(a, c, hdim)
        return (c, h), (i, f, g, o, c, h)

    return lax.scan(step, (c0, h0), jnp.swapaxes(x, 0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def fused_lstm(x: Array, c0: Array, h0: Array, w_ih: Array, w_hh: Array, b: Array, precision=None):
    """An LSTM layer over a whole sequence with a hand-written backward pass: `x [B, T, F]`, initial state
    `c0, h0 [B, H]`, kernels `w_ih [F, 4H]`, `w_hh [H, 4H]` and bias `b [4H]` (gates i, f, g, o) →
    `(outputs [B, T, H], (c_T, h_T))`. The same function as `RNN(LSTMCell(H))` without lengths, computed as
    BENCHMARKS.md found fastest on CPU: both projections inside the step, the forward saving the four gates and the
    cell state as separate [T, B, H] arrays, and one reverse scan computing the gradient of the gates'
    pre-activation, dA, per step, from which it takes dh (the critical path), dx and the weight gradients
    (accumulated in the scan).
    Separate gate arrays matter: XLA's CPU loops do not vectorise a fusion that reads several slices of one
    dynamically-indexed array (5x slower element-wise code, measured)."""
    return _fused_lstm_fwd(x, c0, h0, w_ih, w_hh, b, precision)[0]


def _fused_lstm_fwd(x, c0, h0, w_ih, w_hh, b, precision):
    (c, h), ys = lstm_scan(x, c0, h0, w_ih, w_hh, b, precision)
    return (jnp.swapaxes(ys[5], 0, 1), (c, h)), (x, c0, h0, w_ih, w_hh, b, ys)


def fused_lstm_backward(precision, res, cotangents):
    x, c0, h0, w_ih, w_hh, b, (i, f, g, o, cs, hs) = res
    dys, (dc_t, dh_t) = cotangents
    c_prev, h_prev = shifted(c0, cs), shifted(h0, hs)

    def step(carry, inp):
        dh, dc, dw_ih, dw_hh, db = carry
        i, f, g, o, c, cp, hp, xt, dy = inp
        dh = dh + dy
        tc = jnp.tanh(c)
        dc = dc + dh * o * (1 - tc * tc)
        da = [dc * g * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - g * g), dh * tc * o * (1 - o)]
        da = jnp.concatenate(da, -1)
        dx = jnp.matmul(da, w_ih.T, precision=precision)
        dw_ih = dw_ih + jnp.matmul(xt.T, da, precision=precision)
        dw_hh = dw_hh + jnp.matmul(hp.T, da, precision=precision)
        return (jnp.matmul(da, w_hh.T, precision=precision), dc * f, dw_ih, dw_hh, db + da.sum(0)), dx

    zeros = jnp.zeros_like
    init = (dh_t.astype(hs.dtype), dc_t.astype(cs.dtype), zeros(w_ih), zeros(w_hh), zeros(b))
    xs = (i, f, g, o, cs, c_prev, h_prev, jnp.swapaxes(x, 0, 1), jnp.swapaxes(dys, 0, 1).astype(hs.dtype))
    (dh0, dc0, dw_ih, dw_hh, db), dx = lax.scan(step, init, xs, reverse=True)
    return (
        jnp.swapaxes(dx, 0, 1).astype(x.dtype),
        dc0.astype(c0.dtype),
        dh0.astype(h0.dtype),
        dw_ih.astype(w_ih.dtype),
        dw_hh.astype(w_hh.dtype),
        db.astype(b.dtype),
    )


fused_lstm.defvjp(_fused_lstm_fwd, fused_lstm_backward)
