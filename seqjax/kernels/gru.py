"""The fused GRU kernel: a GRU layer over a whole sequence as one `jax.custom_vjp` with a hand-written backward pass
in JAX ops (what `RNN(GRUCell)` runs where the C++ kernel does not apply), and the GRU cell's equations.

Glossary: B batch, T time, F input features, H hidden features; gates in PyTorch's order r, z, n.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.kernels.lstm import shifted

Array = jax.Array


def gru_gates(xi: Array, hh: Array, h: Array, hdim: int) -> tuple[Array, ...]:
    """GRUCell's equations from both projections [B..., 3H]: (r, z, n, hn, h'), hn the hidden matmul's n part."""
    r = jax.nn.sigmoid(xi[..., :hdim] + hh[..., :hdim])
    z = jax.nn.sigmoid(xi[..., hdim : 2 * hdim] + hh[..., hdim : 2 * hdim])
    hn = hh[..., 2 * hdim :]
    n = jnp.tanh(xi[..., 2 * hdim :] + r * hn)
    return r, z, n, hn, (1.0 - z) * n + z * h


def gru_scan(x, h0, w_ih, w_hh, b_ih, b_hh, precision):
    """Time-major scan; returns (h_T, (r, z, n, hn, h)), each of the five stacked over time [T, B, H]."""
    hdim = w_hh.shape[0]

    def step(h, xt):
        xi = jnp.matmul(xt, w_ih, precision=precision) + b_ih
        hh = jnp.matmul(h, w_hh, precision=precision) + b_hh
        r, z, n, hn, h = gru_gates(xi, hh, h, hdim)
        return h, (r, z, n, hn, h)

    return lax.scan(step, h0, jnp.swapaxes(x, 0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def fused_gru(x: Array, h0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, precision=None):
    """A GRU layer over a whole sequence with a hand-written backward pass, as `fused_lstm`: `x [B, T, F]`, `h0 [B, H]`,
    kernels `w_ih [F, 3H]`, `w_hh [H, 3H]`, biases `b_ih, b_hh [3H]` (gates r, z, n) → `(outputs [B, T, H], h_T)`,
    the same function as `RNN(GRUCell(H))` without lengths. The forward saves r, z, n and the hidden matmul's n part
    as separate [T, B, H] arrays; the reverse scan computes both projections' gradients per step."""
    return _fused_gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, precision)[0]


def _fused_gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, precision):
    h, ys = gru_scan(x, h0, w_ih, w_hh, b_ih, b_hh, precision)
    return (jnp.swapaxes(ys[4], 0, 1), h), (x, h0, w_ih, w_hh, b_ih, b_hh, ys)


def fused_gru_backward(precision, res, cotangents):
    x, h0, w_ih, w_hh, b_ih, b_hh, (r, z, n, hn, hs) = res
    dys, dh_t = cotangents
    h_prev = shifted(h0, hs)

    def step(carry, inp):
        dh, dw_ih, dw_hh, db_ih, db_hh = carry
        r, z, n, hn, hp, xt, dy = inp
        dh = dh + dy
        dan = dh * (1 - z) * (1 - n * n)
        dar = dan * hn * r * (1 - r)
        daz = dh * (hp - n) * z * (1 - z)
        dxi = jnp.concatenate([dar, daz, dan], -1)
        dhh = jnp.concatenate([dar, daz, dan * r], -1)
        dx = jnp.matmul(dxi, w_ih.T, precision=precision)
        dw_ih = dw_ih + jnp.matmul(xt.T, dxi, precision=precision)
        dw_hh = dw_hh + jnp.matmul(hp.T, dhh, precision=precision)
        dh = dh * z + jnp.matmul(dhh, w_hh.T, precision=precision)
        return (dh, dw_ih, dw_hh, db_ih + dxi.sum(0), db_hh + dhh.sum(0)), dx

    zeros = jnp.zeros_like
    init = (dh_t.astype(hs.dtype), zeros(w_ih), zeros(w_hh), zeros(b_ih), zeros(b_hh))
    xs = (r, z, n, hn, h_prev, jnp.swapaxes(x, 0, 1), jnp.swapaxes(dys, 0, 1).astype(hs.dtype))
    (dh0, dw_ih, dw_hh, db_ih, db_hh), dx = lax.scan(step, init, xs, reverse=True)
    return (jnp.swapaxes(dx, 0, 1).astype(x.dtype), dh0.astype(h0.dtype), dw_ih, dw_hh, db_ih, db_hh)


fused_gru.defvjp(_fused_gru_fwd, fused_gru_backward)
