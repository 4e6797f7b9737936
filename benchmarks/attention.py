"""Forward+backward of multi-head self-attention: seqjax against flax's built-in and torch, in one run.

    python benchmarks/attention.py [--batch 32 --length 256 --width 512 --heads 8] [--repeats 15]
    python benchmarks/attention.py --memory [--lengths 1024,2048,4096,16384,65536]
    python benchmarks/attention.py --decoder-step [--length 32768]

Prints the median step time of each implementation, timed in interleaved rounds, and its speed ratio to flax's
`nn.MultiHeadDotProductAttention` and to `torch.nn.MultiheadAttention` (when torch is installed), without and with a
causal mask. seqjax's default ("auto") on CPU is its C++ kernel (`seqjax.kernels.cpu`, when built); "blocked kernel"
is the same layer with `implementation="blocked"` (the kernel in JAX ops). The timed step is value_and_grad of
sum(out²) with respect to the parameters and the input, jit-compiled; torch runs the same forward+backward eagerly
with all cores.

--memory prints the compiled temporary memory (XLA's memory analysis; nothing is run) of that step for causal
self-attention, B=1, width 256, 4 heads: seqjax with `is_causal=True`, seqjax with an explicit `causal_mask(T)`, and
flax's layer with that mask. --decoder-step runs one real training step (value_and_grad and an Adam update) of a
causal DecoderLM at one long length and prints its time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved_medians, interleaved_times, medians, paired_ratios, torch_available

from seqjax.kernels import cpu
from seqjax.models import DecoderLM, TransformerConfig
from seqjax.nn import MultiHeadAttention, causal_mask

TARGET = 1.2  # the speed target against flax's layer, counted per round


def jax_step(module, x, mask):
    """The compiled step."""
    params = module.init(jax.random.key(1), x)

    def loss(p, x):
        return jnp.sum(jnp.square(module.apply(p, x, mask=mask)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = grad.lower(params, x).compile()
    return lambda: jax.block_until_ready(compiled(params, x))


def torch_step(args, causal: bool):
    import torch

    torch.set_num_threads(os.cpu_count())
    mha = torch.nn.MultiheadAttention(args.width, args.heads, batch_first=True)
    x = torch.randn(args.batch, args.length, args.width, requires_grad=True)
    attn_mask = torch.nn.Transformer.generate_square_subsequent_mask(args.length) if causal else None

    def step():
        mha.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = mha(x, x, x, attn_mask=attn_mask, is_causal=causal, need_weights=False)
        out.square().sum().backward()

    return step


def temp_bytes(module, length: int, width: int, **call) -> int:
    """Compiled temporary memory of value_and_grad of sum(out²) for x [1, length, width] (compiled, not run)."""
    x = jax.ShapeDtypeStruct((1, length, width), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    use_mask = call.pop("mask", False)  # built inside the program, as a model builds it
    loss = lambda p, x: jnp.sum(jnp.square(module.apply(p, x, mask=causal_mask(length) if use_mask else None, **call)))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_table(lengths: list[int], width: int = 256, heads: int = 4) -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, {ram / 2**30:.0f} GiB; compiled temp memory (MiB) of "
          f"forward+backward, B=1 D={width} N={heads}, causal, f32")  # fmt: skip
    cols = {
        "seqjax is_causal": (lambda: MultiHeadAttention(num_heads=heads), {"is_causal": True}),
        "seqjax causal_mask(T)": (lambda: MultiHeadAttention(num_heads=heads), {"mask": True}),
        "flax, causal mask": (lambda: nn.MultiHeadDotProductAttention(num_heads=heads), {"mask": True}),
    }
    print(f"  {'T':>6s} " + " ".join(f"{c:>22s}" for c in cols))
    got = {}
    for t in lengths:
        row = []
        for name, (make, call) in cols.items():
            # flax's layer builds float32 [B, N, T, T] logits and weights: past 16384 it needs more than this
            # machine's memory many times over, and XLA takes minutes to say how much.
            if name.startswith("flax") and t > 16384:
                row.append("(not compiled: > RAM)")
                continue
            got[name, t] = temp_bytes(make(), t, width, **call)
            row.append(f"{got[name, t] / 2**20:,.0f}")
        print(f"  {t:>6d} " + " ".join(f"{c:>22s}" for c in row), flush=True)
    for name in cols:
        if (name, 16384) in got and (name, 4096) in got:
            print(f"  {name}: 16384 / 4096 = {got[name, 16384] / got[name, 4096]:.2f}x")


def decoder_step(length: int, width: int = 256, heads: int = 4, layers: int = 2) -> None:
    """One training step of a causal DecoderLM on [1, length] tokens: compile, then time one run."""
    import optax

    cfg = TransformerConfig(
        vocab_size=256, emb_dim=width, num_heads=heads, num_layers=layers, mlp_dim=4 * width, max_len=length,
        dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip
    model = DecoderLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (1, length), 1, 256)
    params = jax.jit(model.init)(jax.random.key(1), tokens[:, :8])["params"]
    tx = optax.adam(1e-3)

    def step(params, opt_state, tokens):
        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = tx.init(params)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
    t1 = time.perf_counter()
    params, opt_state, value = jax.block_until_ready(compiled(params, opt_state, tokens))
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; DecoderLM {layers} layers D={width} N={heads} "
          f"MLP={4 * width} V=256, B=1 T={length - 1}, causal (is_causal), f32, Adam")  # fmt: skip
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
    print(f"  compile {t1 - t0:.1f} s, one step {t2 - t1:.1f} s, loss {float(value):.3f}, "
          f"compiled temp {temp:.2f} GiB, peak RSS {rss:.2f} GiB")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--variants", default="all", help="comma list of seqjax variants, or 'all'")
    p.add_argument("--memory", action="store_true", help="the compiled-memory table of causal attention")
    p.add_argument("--lengths", default="1024,2048,4096,16384,65536", help="lengths of --memory")
    p.add_argument("--decoder-step", action="store_true", help="one training step of a causal DecoderLM")
    args = p.parse_args()
    if args.memory:
        return memory_table([int(t) for t in args.lengths.split(",")])
    if args.decoder_step:
        return decoder_step(32768 + 1 if args.length == 256 else args.length)
    have_torch = torch_available()

    x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.width), jnp.float32)
    default = "seqjax default (C++ CPU kernel)" if cpu.available() else "seqjax default"
    variants = {
        default: dict(),
        "seqjax blocked kernel (fused qkv)": dict(implementation="blocked"),
        "seqjax blocked, unfused qkv": dict(implementation="blocked", fuse_qkv=False),
        "seqjax reference (plain softmax)": dict(implementation="reference"),
        "seqjax jax.nn.dot_product_attention": dict(implementation="jax"),
    }
    if args.variants != "all":
        keep = args.variants.split(",")
        variants = {k: v for k, v in variants.items() if any(s in k for s in keep)}
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores; B={args.batch} "
        f"T={args.length} D={args.width} N={args.heads}, f32, forward+backward, median of {args.repeats}"
    )
    # Model FLOPs of forward+backward (3x the forward): four projections and the two attention matmuls.
    b, t, d = args.batch, args.length, args.width
    flops = 3 * (4 * 2 * b * t * d * d + 2 * 2 * b * t * t * d)
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    peak_t = interleaved_medians({"mm": lambda: jax.block_until_ready(mm(a))}, args.repeats)["mm"]
    peak = 2 * 2048**3 / peak_t / 1e9
    print(f"machine peak (XLA 2048^3 f32 matmul): {peak:.0f} GFLOP/s; model GFLOP per step: {flops / 1e9:.1f}")
    for causal in (False, True):
        mask = causal_mask(args.length) if causal else None
        steps = {"flax": jax_step(nn.MultiHeadDotProductAttention(num_heads=args.heads), x, mask)}
        if have_torch:
            steps["torch"] = torch_step(args, causal)
        for name, kw in variants.items():
            steps[name] = jax_step(MultiHeadAttention(num_heads=args.heads, **kw), x, mask)
        runs = interleaved_times(steps, args.repeats)
        t = medians(runs)
        flax_t, torch_t = t.pop("flax"), t.pop("torch", float("nan"))
        print(f"\n{'causal' if causal else 'no mask'}:")
        print(f"  {'flax nn.MultiHeadDotProductAttention':40s} {flax_t * 1e3:8.1f} ms")
        if have_torch:
            print(f"  {'torch nn.MultiheadAttention':40s} {torch_t * 1e3:8.1f} ms   ({flax_t / torch_t:.2f}x flax)")
        for name, ti in t.items():
            line = f"  {name:40s} {ti * 1e3:8.1f} ms   {flax_t / ti:.2f}x flax   {flops / ti / 1e9 / peak:.2f} of peak"
            if have_torch:
                line += f"   {torch_t / ti:.2f}x torch"
            print(line)
            # The same ratio round by round (flax and the contender ran side by side in each): its spread says how
            # reliably the median holds.
            r = sorted(paired_ratios(runs["flax"], runs[name]))
            q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
            at_least = sum(x >= TARGET for x in r)
            print(
                f"  {'':40s} per round: {r[0]:.2f}-{r[-1]:.2f}x flax (quartiles {q1:.2f}, {q3:.2f}); "
                f">= {TARGET}x in {at_least} of {len(r)} rounds"
            )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
