"""What a GPU/TPU user asks first: training throughput and MFU at GPT-2-small shape, ViT-B/16 images/s, cached
decoding tokens/s.

    python benchmarks/accelerator.py [--part lm,vit,decode] [--batch 16] [--steps 20] [--dtype bfloat16] [--quick]

lm: one training step (forward, backward, AdamW update; parameters and optimizer state donated) of
  `seqjax.models.DecoderLM` at GPT-2-small shape: 12 layers, width 768, 12 heads, MLP 3072, context 1024, vocabulary
  50304 (GPT-2's 50257 padded to a multiple of 128), tied embeddings, no dropout; parameters float32, compute in
  `--dtype` (bfloat16 by default; LayerNorm statistics, softmax and the loss stay float32); the loss is
  `seqjax.training.cross_entropy`. Tokens/s and model FLOPs utilisation (MFU):

      train FLOPs per token = 6 * P + 6 * L * T * D,   P = L * (4 D^2 + 2 D M) + D V

  (P: the weights in matmuls, the tied output layer included; 6 L T D: QK^T and PV forward and backward, counted
  causal, i.e. half of the full T x T, as FlashAttention's papers do. Layer norms, softmax and the optimizer are
  not counted.) MFU divides by the device's dense peak for `--dtype` (a table of NVIDIA and TPU parts below);
  on a device not in the table, and on CPU, by a matmul of that dtype timed in the same run ("measured peak").
vit: one training step of ViT-B/16 (224 x 224, 1000 classes) in `--dtype`, AdamW; images/s and MFU
  (6 * P * tokens + attention, tokens = 197 per image, full attention).
decode: greedy generation with the KV cache (`seqjax.decoding.greedy`: prefill, then one compiled loop), GPT-2-small
  shape, batch `--decode-batch`, a 128-token prompt, 256 new tokens; new tokens/s.

Steps run asynchronously (the host does not wait between them) and are timed as a whole after two warm-up steps,
the median of `--repeats` timings of `--steps` steps. --quick shrinks every shape (2 layers, width 64, T=64,
vocabulary 256, ViT-Mu/8 on 32 x 32 images, 16 new tokens) so that CI runs the whole script on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from _timing import matmul_peak_step

from seqjax import decoding
from seqjax.models import DecoderLM, LMStep, TransformerConfig, lm_state
from seqjax.models.vit import ViT, vit_config
from seqjax.training import cross_entropy

# Dense (no sparsity) peak FLOP/s per chip, from the vendors' data sheets, by a substring of `device_kind`.
PEAK = {
    "bfloat16": [
        ("H200", 989e12),
        ("H100 PCIe", 756e12),
        ("H100", 989e12),  # SXM / HBM3
        ("A100", 312e12),
        ("L40S", 362e12),
        ("L4", 121e12),
        ("TPU v6", 918e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),  # v5p
        ("TPU v4", 275e12),
    ],
    "float32": [  # TF32 tensor-core peaks where a GPU computes float32 matmuls in TF32 by default
        ("H200", 494e12),
        ("H100 PCIe", 378e12),
        ("H100", 494e12),
        ("A100", 156e12),
    ],
}


def device_peak(dtype: str) -> float | None:
    """The data-sheet peak of the first device for `dtype`, or None where it is not in `PEAK`."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    return next((flops for name, flops in PEAK.get(dtype, []) if name in kind), None)


def measured_peak(dtype, n: int) -> float:
    """FLOP/s of a jit-compiled n^3 matmul in `dtype` (median of 5 runs after a warm-up)."""
    step, flops = matmul_peak_step(n, dtype)
    step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times)


def time_steps(step, state, batch, steps: int, repeats: int) -> float:
    """Median seconds per step of `state = step(state, batch)`, `steps` steps dispatched back to back per timing."""
    for _ in range(2):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, loss = step(state, batch)
        jax.block_until_ready((state, loss))
        per_step.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_step)


def train_step(apply, optimizer):
    """The compiled step `(params, opt_state), (inputs, labels) -> (params, opt_state), loss`, state donated."""

    def loss_fn(params, inputs, labels):
        logits = apply(params, inputs).astype(jnp.float32)
        return cross_entropy(logits, labels)[0]

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=(0,))


def lm_config(args, decode_len: int | None = None) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.width, num_heads=args.heads, num_layers=args.layers, mlp_dim=4 * args.width,
        max_len=decode_len or args.length, dropout_rate=0.0, attention_dropout_rate=0.0, dtype=jnp.dtype(args.dtype),
    )  # fmt: skip


def report(name: str, per_step: float, items: int, unit: str, flops: float, peak: float, peak_label: str) -> None:
    achieved = flops / per_step
    print(
        f"  {name:10s} {per_step * 1e3:9.1f} ms/step  {items / per_step:12,.0f} {unit}/s  "
        f"{achieved / 1e12:8.2f} TFLOP/s  MFU {achieved / peak:6.1%} of {peak / 1e12:.1f} TFLOP/s ({peak_label})"
    )


def part_lm(args, peak, label) -> None:
    model = DecoderLM(lm_config(args))
    b, t, d, layers, v = args.batch, args.length, args.width, args.layers, args.vocab
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (b, t + 1), 0, v)
    params = model.init(jax.random.key(1), tokens[:, :t])["params"]
    optimizer = optax.adamw(3e-4, weight_decay=0.1)
    step = train_step(lambda p, x: model.apply({"params": p}, x), optimizer)
    state = (params, optimizer.init(params))
    per_step = time_steps(step, state, (tokens[:, :t], tokens[:, 1:]), args.steps, args.repeats)
    p_matmul = layers * (4 * d * d + 2 * d * 4 * d) + d * v
    flops = (6 * p_matmul + 6 * layers * t * d) * b * t
    report("lm train", per_step, b * t, "tokens", flops, peak, label)


def part_vit(args, peak, label) -> None:
    cfg = vit_config(args.vit, num_classes=args.classes, image_size=args.image_size, dtype=jnp.dtype(args.dtype),
                     dropout_rate=0.0, attention_dropout_rate=0.0)  # fmt: skip
    model = ViT(cfg)
    b = args.vit_batch
    images = jax.random.normal(jax.random.key(0), (b, *cfg.image_hw, 3), jnp.float32)
    labels = jax.random.randint(jax.random.key(1), (b,), 0, args.classes)
    params = model.init(jax.random.key(2), images)["params"]
    optimizer = optax.adamw(1e-3, weight_decay=0.1)
    step = train_step(lambda p, x: model.apply({"params": p}, x), optimizer)
    state = (params, optimizer.init(params))
    per_step = time_steps(step, state, (images, labels), args.steps, args.repeats)
    d, layers, m = cfg.emb_dim, cfg.num_layers, cfg.mlp_dim
    t = cfg.grid[0] * cfg.grid[1] + (cfg.pool == "cls")
    p_matmul = layers * (4 * d * d + 2 * d * m) + cfg.patch_size**2 * 3 * d + d * args.classes
    flops = (6 * p_matmul + 12 * layers * t * d) * b * t
    report("vit train", per_step, b, "images", flops, peak, label)


def part_decode(args) -> None:
    b, prompt_len, new = args.decode_batch, args.prompt, args.new_tokens
    model = DecoderLM(lm_config(args, decode_len=prompt_len + new))
    prompt = jax.random.randint(jax.random.key(0), (b, prompt_len), 1, args.vocab)
    params = model.init(jax.random.key(1), prompt)["params"]
    step = LMStep(model)

    def generate():
        state = lm_state(model, params, b, prompt_len + new)
        return jax.block_until_ready(decoding.greedy(step, state, prompt, new))

    generate()  # compile
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        generate()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    print(f"  {'decode':10s} {seconds * 1e3:9.1f} ms for {new} tokens x {b}  {b * new / seconds:12,.0f} tokens/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="lm,vit,decode", help="comma list of lm, vit, decode")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=16, help="lm training batch (sequences of --length tokens)")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--vit", default="B/16", help="ViT variant")
    p.add_argument("--vit-batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings; the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke test")
    args = p.parse_args()
    parts = set(args.part.split(","))
    if parts - {"lm", "vit", "decode"}:
        p.error(f"unknown --part {sorted(parts - {'lm', 'vit', 'decode'})}")
    if args.quick:
        quick = dict(batch=2, length=64, layers=2, width=64, heads=4, vocab=256, vit="Mu/8", vit_batch=4,
                     image_size=32, classes=10, decode_batch=2, prompt=8, new_tokens=16, steps=2,
                     repeats=1)  # fmt: skip
        vars(args).update(quick)

    device = jax.devices()[0]
    peak = device_peak(args.dtype)
    label = f"{device.device_kind} data sheet"
    if peak is None:
        peak, label = measured_peak(args.dtype, 512 if args.quick else 4096), f"measured {args.dtype} matmul"
    print(
        f"== {device.platform}: {device.device_kind} x{jax.device_count()}, jax {jax.__version__}, {args.dtype}; "
        f"lm L={args.layers} D={args.width} N={args.heads} T={args.length} V={args.vocab} B={args.batch}"
    )
    if "lm" in parts:
        part_lm(args, peak, label)
    if "vit" in parts:
        part_vit(args, peak, label)
    if "decode" in parts:
        part_decode(args)


if __name__ == "__main__":
    main()
