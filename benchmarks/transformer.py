"""Transformer models end to end: training step against torch, compile time against depth, cached decoding.

    python benchmarks/transformer.py [--part train,compile,decode] [--repeats 10] [--scan-layers]
        [--remat-policy none] [--quick]

train: one step (forward, backward, Adam update) of an encoder language model, 6 layers, D=512, 8 heads, MLP 2048,
  B=16, T=256, V=8192, float32, no dropout, pre-LN, relu: `seqjax.models.Encoder` plus an output layer to the
  vocabulary with mean softmax cross-entropy against random targets (`--loss fused`, the default: computed chunk by
  chunk by `seqjax.training.fused_linear_cross_entropy`; `--loss plain`: Dense, logits, optax), `optax.adam`, the
  whole step jit-compiled with the parameters and optimizer state donated; against `torch.nn.TransformerEncoder`
  (norm_first) with an embedding, the same sinusoidal positions, a final LayerNorm, a Linear to the vocabulary,
  `F.cross_entropy` and `torch.optim.Adam`, eager on all cores.
  Median step time (interleaved rounds), tokens/s, speed ratio to torch, and model GFLOP/s as a fraction of the
  machine's float32 matmul peak (a jitted 2048^3 `jnp.dot`, 2*n^3 flops, timed in the same run). Model FLOPs:

      train FLOPs = 6 * P_matmul * B*T + 3 * L * 4*B*T*T*D,   P_matmul = L * (4*D*D + 2*D*M) + D*V

  (P_matmul: the weights that take part in matmuls, not the embedding lookup; 4*B*T*T*D: QK^T and PV per layer
  forward; x3 for forward+backward; layer norms, softmax, biases and the optimizer are not counted). Ours also
  builds and applies a padding mask (token id 0), which torch does not; tokens are drawn from 1..V-1.
compile: trace + lower + compile of the same training step, from fresh jit objects, at 2, 6, 12 and 24 layers,
  unrolled and with `scan_layers=True`; the table gives seconds and the 24-layer / 2-layer ratio.
decode: 256 tokens, 6 layers, D=512, 8 heads, MLP 2048, B=8, with `seqjax.models.DecoderLM` and the KV cache
  (`LMStep` jit-compiled, one token per call, cache donated), each step timed on its own after a
  warm-up pass (median over --decode-passes passes); the mean per-token time of the first and last 64 tokens and
  their ratio. Baseline: recompute, i.e. at every step the full forward of the decode=False model on the tokens so
  far, padded up to the next multiple of 32 (8 compilations; causal, so the logits at t are exact). Totals over
  the 256 tokens and the speed-up.

--quick shrinks everything (2 layers, D=64, 4 heads, MLP 256, B=2, T=32, V=256, decode 32 tokens, compile at 1 and
2 layers, a 512^3 peak matmul) for a smoke test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import interleaved_medians, interleaved_times, matmul_peak_step, medians, paired_ratios, torch_available

from seqjax.models import DecoderLM, Encoder, LMStep, TransformerConfig, lm_state
from seqjax.models.transformer import REMAT_POLICIES
from seqjax.nn.position import sinusoidal_embedding
from seqjax.training import fused_linear_cross_entropy


class EncoderLM(nn.Module):
    """`Encoder` then an output layer to the vocabulary: `(tokens [B, T], targets [B, T]) -> mean cross-entropy`.

    loss "fused": `seqjax.training.fused_linear_cross_entropy` (chunked; the [B*T, V] logits never exist);
    "plain": a Dense to logits `[B, T, V]`, then optax's cross-entropy. The same function, same parameter shapes.
    """

    config: TransformerConfig
    loss: str = "fused"

    @nn.compact
    def __call__(self, tokens, targets):
        x = Encoder(self.config, name="encoder")(tokens)
        v = self.config.vocab_size
        if self.loss == "plain":
            logits = nn.Dense(v, name="logits")(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], v))
        bias = self.param("bias", nn.initializers.zeros_init(), (v,))
        return fused_linear_cross_entropy(x, kernel, bias, targets)


def make_config(args, **changes) -> TransformerConfig:
    cfg = TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.width, num_heads=args.heads, num_layers=args.layers,
        mlp_dim=args.mlp, max_len=args.length, dropout_rate=0.0, attention_dropout_rate=0.0, activation="relu",
        tie_embeddings=False, scan_layers=args.scan_layers, remat_policy=args.remat_policy,
    )  # fmt: skip
    return cfg.replace(**changes)


def make_train_step(model: nn.Module, opt: optax.GradientTransformation):
    """A fresh (uncached) function `(params, opt_state, tokens, targets) -> (params, opt_state, loss)`."""

    def step(params, opt_state, tokens, targets):
        def loss_fn(p):
            return model.apply({"params": p}, tokens, targets)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def random_tokens(key, shape, vocab):
    return jax.random.randint(key, shape, 1, vocab, jnp.int32)  # never 0, the padding id


def jax_train(args, tokens, targets):
    model, opt = EncoderLM(make_config(args), loss=args.loss), optax.adam(1e-4)
    params = model.init(jax.random.key(1), tokens, targets)["params"]
    state = [params, opt.init(params)]
    step = jax.jit(make_train_step(model, opt), donate_argnums=(0, 1))

    def run():
        state[0], state[1], loss = step(state[0], state[1], tokens, targets)
        jax.block_until_ready((state, loss))

    return run


def torch_train(args, tokens, targets):
    import torch

    torch.set_num_threads(os.cpu_count())
    d, v = args.width, args.vocab
    pos = torch.from_numpy(np.array(sinusoidal_embedding(jnp.arange(args.length), d)))

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(v, d)
            self.register_buffer("pos", pos)
            layer = torch.nn.TransformerEncoderLayer(
                d, args.heads, args.mlp, dropout=0.0, activation="relu", batch_first=True, norm_first=True
            )
            self.encoder = torch.nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
            self.norm, self.out = torch.nn.LayerNorm(d), torch.nn.Linear(d, v)

        def forward(self, x):
            return self.out(self.norm(self.encoder(self.embed(x) + self.pos)))

    model = TorchLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.from_numpy(np.array(tokens)).long(), torch.from_numpy(np.array(targets)).long().flatten()

    def run():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y).backward()
        opt.step()

    return run


def measure_peak(args) -> float:
    step, flops = matmul_peak_step(args.peak_n)
    return flops / interleaved_medians({"mm": step}, args.repeats)["mm"] / 1e9


def part_train(args, have_torch: bool) -> None:
    b, t, d, m, v, n_layers = args.batch, args.length, args.width, args.mlp, args.vocab, args.layers
    p_matmul = n_layers * (4 * d * d + 2 * d * m) + d * v
    flops = 6 * p_matmul * b * t + 3 * n_layers * 4 * b * t * t * d
    peak = measure_peak(args)
    print(
        f"\n== train step: L={n_layers} D={d} N={args.heads} M={m} B={b} T={t} V={v}, f32, adam, "
        f"scan_layers={args.scan_layers} remat={args.remat_policy}, median of {args.repeats}"
    )
    print(f"machine peak ({args.peak_n}^3 f32 jnp.dot): {peak:.0f} GFLOP/s; model GFLOP per step: {flops / 1e9:.2f}")
    keys = jax.random.split(jax.random.key(0))
    tokens, targets = (random_tokens(k, (b, t), v) for k in keys)
    steps = {f"seqjax Encoder, {args.loss} loss (jit)": jax_train(args, tokens, targets)}
    if have_torch:
        steps["torch TransformerEncoder (eager)"] = torch_train(args, tokens, targets)
    times = interleaved_medians(steps, args.repeats)
    torch_t = times.get("torch TransformerEncoder (eager)")
    print(f"  {'':34s} {'ms/step':>9s} {'tokens/s':>10s} {'of peak':>8s} {'x torch':>8s}")
    for name, ti in times.items():
        ratio = f"{torch_t / ti:8.2f}" if torch_t else f"{'-':>8s}"
        print(f"  {name:34s} {ti * 1e3:9.1f} {b * t / ti:10.0f} {flops / ti / 1e9 / peak:8.2f} {ratio}")


def compile_seconds(args, layers: int, scan: bool) -> float:
    """Trace + lower + compile of the training step at `layers` layers, from a fresh model, step and jit."""
    model = EncoderLM(make_config(args, num_layers=layers, scan_layers=scan), loss=args.loss)
    opt = optax.adam(1e-4)
    tokens = jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32)
    ones = jnp.ones(tokens.shape, tokens.dtype)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ones, ones)["params"])
    opt_state = jax.eval_shape(opt.init, params)
    step = make_train_step(model, opt)
    t0 = time.perf_counter()
    jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens, tokens).compile()
    return time.perf_counter() - t0


def part_compile(args) -> None:
    counts = [int(c) for c in args.compile_layers.split(",")]
    print(
        f"\n== compile time of the train step (trace + lower + compile, s; median of {args.compile_repeats}): "
        f"D={args.width} B={args.batch} T={args.length} V={args.vocab}, remat={args.remat_policy}"
    )
    print(f"  {'':14s}" + "".join(f"{f'L={c}':>9s}" for c in counts) + f"   L={counts[-1]} / L={counts[0]}")
    compile_seconds(args, counts[0], False)  # discarded: one-time costs of the first compilation in the process
    for scan in (False, True):
        secs = [statistics.median(compile_seconds(args, c, scan) for _ in range(args.compile_repeats)) for c in counts]
        label = "scan_layers" if scan else "unrolled"
        print(f"  {label:14s}" + "".join(f"{s:9.2f}" for s in secs) + f"   {secs[-1] / secs[0]:.2f}x")


def part_decode(args) -> None:
    n, b = args.decode_len, args.decode_batch
    cfg = TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.width, num_heads=args.heads, num_layers=args.layers, mlp_dim=args.mlp,
        max_len=n, dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip
    model = DecoderLM(cfg)
    tokens = random_tokens(jax.random.key(2), (b, n), args.vocab)
    params = model.init(jax.random.key(3), tokens)["params"]
    columns = [jax.block_until_ready(tokens[:, t : t + 1]) for t in range(n)]
    lm_step = LMStep(model)

    def cached_fn(params, cache, token):
        logits, state = lm_step({"params": params, "cache": cache}, token)
        return logits, state["cache"]

    cached = jax.jit(cached_fn, donate_argnums=(1,))

    def cached_pass():
        cache = lm_state(model, params, b, n)["cache"]
        times = np.zeros(n)
        for t in range(n):
            t0 = time.perf_counter()
            logits, cache = cached(params, cache, columns[t])
            logits.block_until_ready()
            times[t] = time.perf_counter() - t0
        return times, logits[:, 0]

    cached_pass()  # compile and warm up
    passes = [cached_pass() for _ in range(args.decode_passes)]
    per_token = np.median(np.stack([p[0] for p in passes]), axis=0)
    cached_last = passes[-1][1]

    # Recompute baseline: at step t the full forward over tokens[:, :t+1], padded up to the next multiple of
    # `bucket` (a handful of compilations, each step within `bucket` tokens of its true cost).
    bucket = max(1, min(32, n // 8))

    @jax.jit  # compiles once per padded length
    def recompute(params, prefix, t):
        return model.apply({"params": params}, prefix)[:, t]

    def recompute_inputs(t):
        length = -(-(t + 1) // bucket) * bucket
        return jax.block_until_ready(jnp.where(jnp.arange(length) <= t, tokens[:, :length], 0))

    for t in range(bucket - 1, n, bucket):  # compile every bucket first
        jax.block_until_ready(recompute(params, recompute_inputs(t), t))
    recompute_times = np.zeros(n)
    for t in range(n):
        prefix = recompute_inputs(t)
        t0 = time.perf_counter()
        full_last = jax.block_until_ready(recompute(params, prefix, t))
        recompute_times[t] = time.perf_counter() - t0
    err = float(jnp.max(jnp.abs(full_last - cached_last)))

    k = min(64, n // 4)
    first, last = per_token[:k].mean(), per_token[-k:].mean()
    cached_total, recompute_total = per_token.sum(), recompute_times.sum()
    print(
        f"\n== decode {n} tokens: L={args.layers} D={args.width} N={args.heads} M={args.mlp} B={b} V={args.vocab}, "
        f"f32; cached per-token times: median of {args.decode_passes} passes"
    )
    ms = f"first {k} {first * 1e3:.2f} ms, last {k} {last * 1e3:.2f} ms"
    print(f"  cached, per token: {ms}  (last/first {last / first:.2f})")
    print(f"  {'':28s} {'total s':>9s} {'tokens/s':>10s}")
    print(f"  {'cached (KV cache)':28s} {cached_total:9.3f} {b * n / cached_total:10.0f}")
    print(f"  {'recompute (full forward)':28s} {recompute_total:9.3f} {b * n / recompute_total:10.0f}")
    print(f"  speed-up of the cache: {recompute_total / cached_total:.1f}x; last-step logits max |diff| {err:.1e}")


# ------------------------------------------------------------------------------------------------------------------
# nanoGPT's CPU quick-start shape, trained the way a researcher's own script does it (issue 22, item 5)
# ------------------------------------------------------------------------------------------------------------------

NANO = dict(layers=4, width=128, heads=4, mlp=512, batch=12, length=64, vocab=65)


def nano_config(**changes) -> TransformerConfig:
    """nanoGPT's quick-start model as a `DecoderLM` config: learned positions, tied embeddings, GELU, no dropout."""
    n = NANO
    cfg = TransformerConfig(
        vocab_size=n["vocab"], emb_dim=n["width"], num_heads=n["heads"], num_layers=n["layers"], mlp_dim=n["mlp"],
        max_len=n["length"], dropout_rate=0.0, attention_dropout_rate=0.0, position="learned", activation="gelu",
    )  # fmt: skip
    return cfg.replace(**changes)


def nano_batches(count: int = 8):
    """`count` (inputs, targets) pairs of numpy int64 arrays [B, T], as a script's `get_batch` hands them over."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, NANO["vocab"], size=NANO["batch"] * NANO["length"] * count + 1)
    b, t = NANO["batch"], NANO["length"]
    return [
        (data[i * b * t : (i + 1) * b * t].reshape(b, t), data[i * b * t + 1 : (i + 1) * b * t + 1].reshape(b, t))
        for i in range(count)
    ]


def nano_adamw():
    return optax.adamw(1e-3, b1=0.9, b2=0.99, weight_decay=0.1)


def nano_jax(batches, steps_per_call: int, donate: bool, **changes):
    """The plain script: `DecoderLM` + `optax.adamw` + optax's integer-label cross-entropy in one `jax.jit` step,
    numpy batches in, the loss read back every step (nanoGPT's quick start logs every step)."""
    model, opt = DecoderLM(nano_config(**changes)), nano_adamw()
    params = model.init(jax.random.key(0), batches[0][0])["params"]
    state = [params, opt.init(params)]

    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1) if donate else ())
    it = [0]

    def run():
        for _ in range(steps_per_call):
            x, y = batches[it[0] % len(batches)]
            it[0] += 1
            state[0], state[1], loss = step(state[0], state[1], x, y)
            float(loss)

    return run, sum(p.size for p in jax.tree.leaves(params))


def nano_torch(batches, steps_per_call: int, threads: int):
    """The same model in torch eager, written as nanoGPT writes it (pre-LN blocks, fused qkv Linear,
    `F.scaled_dot_product_attention(is_causal=True)`, MLP 4x GELU (tanh, as flax's `nn.gelu`), tied embeddings
    scaled by 1/sqrt(D) as `DecoderLM`'s), with biases where ours has them, `torch.optim.AdamW`."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    n = NANO
    d, h, v = n["width"], n["heads"], n["vocab"]

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.c_attn, self.c_proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.c_fc, self.mlp_proj = torch.nn.Linear(d, n["mlp"]), torch.nn.Linear(n["mlp"], d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, val = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, val = (a.view(b, t, h, d // h).transpose(1, 2) for a in (q, k, val))
            y = F.scaled_dot_product_attention(q, k, val, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = torch.nn.Embedding(v, d), torch.nn.Embedding(n["length"], d)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(n["layers"]))
            self.ln_f = torch.nn.LayerNorm(d)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ (self.wte.weight * d**-0.5).t()

    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    it = [0]

    def run():
        for _ in range(steps_per_call):
            x, y = (torch.from_numpy(a) for a in batches[it[0] % len(batches)])
            it[0] += 1
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, v), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()

    return run, sum(p.numel() for p in model.parameters())


NANO_VARIANTS = {
    "plain": dict(donate=False),  # what a researcher writes: jax.jit(train_step)
    "donate": dict(donate=True),  # jax.jit(train_step, donate_argnums=(0, 1))
    "reference": dict(donate=False, attention_implementation="reference"),
    "blocked": dict(donate=False, attention_implementation="blocked"),
    "scan": dict(donate=False, scan_layers=True),
}


def part_nanogpt(args, have_torch: bool) -> None:
    n, k = NANO, args.nano_steps
    names = args.nano_variants.split(",")
    if set(names) - set(NANO_VARIANTS):
        raise SystemExit(f"unknown --nano-variants {sorted(set(names) - set(NANO_VARIANTS))}")
    print(
        f"\n== nanoGPT CPU quick-start shape: L={n['layers']} D={n['width']} N={n['heads']} M={n['mlp']} "
        f"B={n['batch']} T={n['length']} V={n['vocab']}, f32, adamw; torch threads "
        f"{args.torch_threads or os.cpu_count()}; {k} steps per timed call, "
        f"median of {args.repeats} interleaved calls"
    )
    batches = nano_batches()
    steps, counts = {}, {}
    for name in names:
        steps[f"seqjax DecoderLM, jit, {name}"], counts[name] = nano_jax(batches, k, **NANO_VARIANTS[name])
    if have_torch:
        steps["torch eager"], counts["torch"] = nano_torch(batches, k, args.torch_threads or os.cpu_count())
    print("  parameters: " + ", ".join(f"{name} {c:,}" for name, c in counts.items()))
    times = interleaved_times(steps, args.repeats)
    med = medians(times)
    torch_t = med.get("torch eager")
    print(f"  {'':34s} {'ms/step':>9s} {'x torch':>8s} {'paired x torch (min-max)':>25s}")
    for name, ti in med.items():
        ratio, spread = f"{'-':>8s}", ""
        if torch_t:
            r = paired_ratios(times["torch eager"], times[name])
            ratio, spread = f"{torch_t / ti:8.2f}", f"{min(r):.2f}-{max(r):.2f}"
        print(f"  {name:34s} {ti * 1e3 / k:9.2f} {ratio} {spread:>25s}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="train,compile,decode", help="comma list of train, compile, decode, nanogpt")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--scan-layers", action="store_true", help="train part: TransformerConfig.scan_layers")
    p.add_argument("--remat-policy", default="none", choices=["none", *REMAT_POLICIES], help="train and compile")
    p.add_argument(
        "--loss", choices=["fused", "plain"], default="fused", help="our output layer + loss (train, compile)"
    )
    p.add_argument("--compile-layers", default="2,6,12,24", help="comma list of layer counts")
    p.add_argument("--compile-repeats", type=int, default=1)
    p.add_argument("--decode-len", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-passes", type=int, default=3)
    p.add_argument("--peak-n", type=int, default=2048, help="size of the peak-measuring matmul")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--nano-steps", type=int, default=10, help="nanogpt part: training steps per timed call")
    p.add_argument("--torch-threads", type=int, default=0, help="nanogpt part: torch's threads (0: every core)")
    p.add_argument(
        "--nano-variants", default="plain,donate", help=f"nanogpt part: comma list of {', '.join(NANO_VARIANTS)}"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument(
        "--xla-flags",
        choices=["default", "ynn-off"],
        default="default",
        help="ynn-off: add --xla_cpu_experimental_ynn_fusion_type= (XLA's YNNPACK fusions off) before JAX starts",
    )
    args = p.parse_args()
    if args.xla_flags == "ynn-off":  # XLA reads XLA_FLAGS when its backends start, i.e. at the first computation
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()
    if args.quick:
        quick = dict(layers=2, width=64, heads=4, mlp=256, batch=2, length=32, vocab=256, decode_len=32, decode_batch=2)
        quick.update(compile_layers="1,2", peak_n=512, repeats=min(args.repeats, 3), decode_passes=1)
        vars(args).update(quick)
    parts = set(args.part.split(","))
    known = {"train", "compile", "decode", "nanogpt"}
    if parts - known:
        p.error(f"unknown --part {sorted(parts - known)}")
    have_torch = torch_available()
    torch_version = "not installed"
    if have_torch:
        import torch

        torch_version = torch.__version__
    print(
        f"jax {jax.__version__}, flax {flax.__version__}, torch {torch_version}; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores" + ("; --quick" if args.quick else "")
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (--xla-flags {args.xla_flags})")
    if "train" in parts:
        part_train(args, have_torch)
    if "compile" in parts:
        part_compile(args)
    if "decode" in parts:
        part_decode(args)
    if "nanogpt" in parts:
        part_nanogpt(args, have_torch)


if __name__ == "__main__":
    main()
