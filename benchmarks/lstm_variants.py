"""LSTM formulations tried for seqjax.nn.LSTM, forward+backward, against flax's nn.RNN(OptimizedLSTMCell) and torch.

    PYTHONPATH=. python benchmarks/lstm_variants.py [--repeats 8] [--variants inside,fused]

B=64, T=128, F=256, H=256, f32, one layer, loss sum(out²) w.r.t. the weights and the input, jit-compiled. Each
variant is a plain-JAX layer (zero initial state) so that only the formulation differs:
  inside            both projections inside the scan step, autodiff (what seqjax.nn.LSTM did before fused_lstm)
  fused             seqjax.kernels.fused_lstm (what seqjax.nn.LSTM runs): "inside" with a hand-written
                    backward pass, the gates saved as separate arrays, weight gradients accumulated in the scan
  hoisted           x W_ih for all steps as one matmul before the scan
  hoisted unroll4   the same, scan unrolled 4 steps
  concat            one matmul per step: [x_t, h] x [W_ih; W_hh]
  custom bwd        hoisted forward; a custom VJP whose reverse scan emits the gate gradients dG, then one matmul
                    each for dW_hh, dW_ih and dx over all steps
  matmuls only      not an LSTM: the same per-step matmuls (x W_ih and h W_hh forward; dA W_ihᵀ, dA W_hhᵀ, xᵀ dA,
                    h_prevᵀ dA backward) with one tanh as the only element-wise work, h' = tanh((x W_ih + h W_hh
                    + b)[:, :H]); a lower bound for any formulation that runs the matmuls step by step
  ... tanh          the same with the four gate nonlinearities as one tanh over the whole [B, 4H] pre-activation
                    (σ(a) = (1 + tanh(a/2)) / 2: one contiguous elementwise op instead of four over slices)
"""

from __future__ import annotations

import argparse
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from _timing import interleaved_medians, torch_available
from jax import lax

from seqjax.kernels import fused_lstm

B, T, F, H = 64, 128, 256, 256


def _gates(c, a):
    i, f, g, o = (
        jax.nn.sigmoid(a[:, :H]),
        jax.nn.sigmoid(a[:, H : 2 * H]),
        jnp.tanh(a[:, 2 * H : 3 * H]),
        jax.nn.sigmoid(a[:, 3 * H :]),
    )
    c = f * c + i * g
    return c, o * jnp.tanh(c), (i, f, g, o)


_SCALE = jnp.concatenate([jnp.full(2 * H, 0.5), jnp.ones(H), jnp.full(H, 0.5)])  # i, f: σ; g: tanh; o: σ


def _gates_tanh(c, a):
    """As `_gates`, with σ(a) = (1 + tanh(a/2)) / 2: one tanh over the whole [B, 4H]."""
    s = jnp.tanh(a * _SCALE) * _SCALE + (1.0 - _SCALE)
    i, f, g, o = s[:, :H], s[:, H : 2 * H], s[:, 2 * H : 3 * H], s[:, 3 * H :]
    c = f * c + i * g
    return c, o * jnp.tanh(c), (i, f, g, o)


def _scan(step, xs, unroll=1):
    zeros = (jnp.zeros((B, H)), jnp.zeros((B, H)))
    return lax.scan(step, zeros, xs, unroll=unroll)


def inside(p, x, gates=_gates):
    wi, wh, b = p

    def step(carry, xt):
        c, h, _ = gates(carry[0], xt @ wi + carry[1] @ wh + b)
        return (c, h), h

    return jnp.swapaxes(_scan(step, jnp.swapaxes(x, 0, 1))[1], 0, 1)


def _tanh_only(c, a):
    """Not LSTM gates: h = tanh(a[:, :H]), for the "matmuls only" floor."""
    return c, jnp.tanh(a[:, :H]), ()


def _hoist(p, x):
    wi, _, b = p
    return jnp.swapaxes((x.reshape(B * T, F) @ wi + b).reshape(B, T, 4 * H), 0, 1)  # [T, B, 4H]


def hoisted(p, x, unroll=1):
    wh = p[1]

    def step(carry, g):
        c, h, _ = _gates(carry[0], g + carry[1] @ wh)
        return (c, h), h

    return jnp.swapaxes(_scan(step, _hoist(p, x), unroll)[1], 0, 1)


def concat(p, x):
    wi, wh, b = p
    w = jnp.concatenate([wi, wh], 0)

    def step(carry, xt):
        c, h, _ = _gates(carry[0], jnp.concatenate([xt, carry[1]], -1) @ w + b)
        return (c, h), h

    return jnp.swapaxes(_scan(step, jnp.swapaxes(x, 0, 1))[1], 0, 1)


def _forward_saving(p, x, gates=_gates):
    wh = p[1]

    def step(carry, g):
        c, h, acts = gates(carry[0], g + carry[1] @ wh)
        return (c, h), (h, c, jnp.concatenate(acts, -1))

    return _scan(step, _hoist(p, x))[1]  # hs, cs [T, B, H]; acts [T, B, 4H]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def custom_bwd(p, x, gates=_gates):
    return jnp.swapaxes(_forward_saving(p, x, gates)[0], 0, 1)


def _custom_fwd(p, x, gates=_gates):
    hs, cs, acts = _forward_saving(p, x, gates)
    return jnp.swapaxes(hs, 0, 1), (p, x, hs, cs, acts)


def _custom_bwd(gates, res, dy):
    (wi, wh, _), x, hs, cs, acts = res
    c_prev = jnp.concatenate([jnp.zeros((1, B, H)), cs[:-1]], 0)

    def step(carry, inp):
        dh, dc = carry
        dyt, c, cp, a = inp
        i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
        dh = dh + dyt
        tc = jnp.tanh(c)
        dc = dc + dh * o * (1 - tc * tc)
        dg = jnp.concatenate(
            [dc * g * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - g * g), dh * tc * o * (1 - o)], -1
        )
        return (dg @ wh.T, dc * f), dg

    _, dgs = lax.scan(
        step, (jnp.zeros((B, H)), jnp.zeros((B, H))), (jnp.swapaxes(dy, 0, 1), cs, c_prev, acts), reverse=True
    )
    dg = dgs.reshape(T * B, 4 * H)
    h_prev = jnp.concatenate([jnp.zeros((1, B, H)), hs[:-1]], 0).reshape(T * B, H)
    x_tb = jnp.swapaxes(x, 0, 1).reshape(T * B, F)
    dx = jnp.swapaxes((dg @ wi.T).reshape(T, B, F), 0, 1)
    return (x_tb.T @ dg, h_prev.T @ dg, dg.sum(0)), dx


custom_bwd.defvjp(_custom_fwd, _custom_bwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--variants", default="all", help="comma list of substrings of the variants' names, or 'all'")
    args = p.parse_args()
    x = jax.random.normal(jax.random.key(0), (B, T, F))
    k1, k2 = jax.random.split(jax.random.key(1))
    params = (jax.random.normal(k1, (F, 4 * H)) * 0.05, jax.random.normal(k2, (H, 4 * H)) * 0.05, jnp.zeros(4 * H))

    def step_of(layer, params):
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.square(layer(p, x))), argnums=(0, 1)))
        return lambda: jax.block_until_ready(grad(params, x))

    ref = jax.grad(lambda p: jnp.sum(jnp.sin(inside(p, x))))(params)
    for name, layer in (("custom bwd", custom_bwd), ("custom bwd tanh", lambda p, x: custom_bwd(p, x, _gates_tanh)),
                        ("inside tanh", lambda p, x: inside(p, x, _gates_tanh))):  # fmt: skip
        got = jax.grad(lambda p, layer=layer: jnp.sum(jnp.sin(layer(p, x))))(params)
        err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12)) for a, b in zip(ref, got, strict=True))
        print(f"{name} gradient vs autodiff of inside: max relative error {err:.1e}")

    flax_rnn = nn.RNN(nn.OptimizedLSTMCell(H))
    steps = {
        "flax nn.RNN(OptimizedLSTMCell)": step_of(flax_rnn.apply, flax_rnn.init(jax.random.key(2), x)),
        "inside": step_of(inside, params),
        "fused": step_of(lambda p, x: fused_lstm(x, jnp.zeros((B, H)), jnp.zeros((B, H)), *p)[0], params),
        "hoisted": step_of(hoisted, params),
        "hoisted unroll4": step_of(lambda p, x: hoisted(p, x, 4), params),
        "concat": step_of(concat, params),
        "custom bwd": step_of(custom_bwd, params),
        "inside tanh": step_of(lambda p, x: inside(p, x, _gates_tanh), params),
        "custom bwd tanh": step_of(lambda p, x: custom_bwd(p, x, _gates_tanh), params),
        "matmuls only": step_of(lambda p, x: inside(p, x, _tanh_only), params),
    }
    if args.variants != "all":
        keep = args.variants.split(",")
        steps = {k: v for k, v in steps.items() if k.startswith("flax") or any(w == k for w in keep)}
    if torch_available():
        import torch

        torch.set_num_threads(os.cpu_count())
        layer, xt = torch.nn.LSTM(F, H, batch_first=True), torch.randn(B, T, F, requires_grad=True)

        def torch_step():
            layer.zero_grad(set_to_none=True)
            xt.grad = None
            layer(xt)[0].square().sum().backward()

        steps["torch nn.LSTM"] = torch_step
    t = interleaved_medians(steps, args.repeats)
    flax_t, torch_t = t["flax nn.RNN(OptimizedLSTMCell)"], t.get("torch nn.LSTM")
    print(
        f"jax {jax.__version__}, {os.cpu_count()} cores; B={B} T={T} F={F} H={H}, f32, forward+backward, "
        f"median of {args.repeats}"
    )
    for name, ti in t.items():
        line = f"  {name:32s} {ti * 1e3:7.1f} ms  {flax_t / ti:.2f}x flax"
        if torch_t:
            line += f"  {torch_t / ti:.2f}x torch"
        print(line)


if __name__ == "__main__":
    main()
