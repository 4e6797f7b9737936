"""LSTM and GRU layers, forward and forward+backward: seqjax against flax's nn.RNN and torch, in one run.

    python benchmarks/recurrent.py [--batch 64 --length 128 --features 256 --hidden 256] [--repeats 10]

Prints tokens/s (batch * length per second) of each contender and its speed ratio to flax's
`nn.RNN(nn.OptimizedLSTMCell)` / `nn.RNN(nn.GRUCell)` and to `torch.nn.LSTM` / `GRU` (when torch is installed).
The forward+backward step is value_and_grad of sum(out²) with respect to the parameters and the input, jit-compiled;
torch runs the same step eagerly with all cores.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from _timing import interleaved_medians, torch_available

from seqjax.nn import GRU, LSTM


def jax_steps(apply, params, x):
    loss = lambda p, x: jnp.sum(jnp.square(apply(p, x)))
    fwd = jax.jit(apply)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return (lambda: jax.block_until_ready(fwd(params, x))), (lambda: jax.block_until_ready(grad(params, x)))


def torch_steps(kind, args):
    import torch

    torch.set_num_threads(os.cpu_count())
    layer = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(args.features, args.hidden, batch_first=True)
    x = torch.randn(args.batch, args.length, args.features, requires_grad=True)

    def fwd():
        with torch.no_grad():
            layer(x)

    def grad():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x)[0].square().sum().backward()

    return fwd, grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    have_torch = torch_available()
    x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.features), jnp.float32)
    tokens = args.batch * args.length
    print(
        f"jax {jax.__version__}, {os.cpu_count()} cores; B={args.batch} T={args.length} F={args.features} "
        f"H={args.hidden}, f32, median of {args.repeats}"
    )
    for kind in ("lstm", "gru"):
        flax_cell = nn.OptimizedLSTMCell(args.hidden) if kind == "lstm" else nn.GRUCell(args.hidden)
        flax_rnn = nn.RNN(flax_cell)
        ours = (LSTM if kind == "lstm" else GRU)(args.hidden)
        contenders = {
            "flax nn.RNN": jax_steps(flax_rnn.apply, flax_rnn.init(jax.random.key(1), x), x),
            "seqjax": jax_steps(lambda p, x, m=ours: m.apply(p, x)[0], ours.init(jax.random.key(1), x), x),
        }
        if have_torch:
            contenders["torch"] = torch_steps(kind, args)
        for mode, index in (("forward", 0), ("forward+backward", 1)):
            t = interleaved_medians({name: steps[index] for name, steps in contenders.items()}, args.repeats)
            print(f"\n{kind.upper()} {mode}:")
            for name, ti in t.items():
                line = (
                    f"  {name:14s} {ti * 1e3:8.1f} ms  {tokens / ti:10.0f} tokens/s  {t['flax nn.RNN'] / ti:.2f}x flax"
                )
                if have_torch:
                    line += f"  {t['torch'] / ti:.2f}x torch"
                print(line)


if __name__ == "__main__":
    main()
