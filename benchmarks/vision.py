"""Vision models: ViT training step against the machine's matmul peak; image-token generation with and without the
KV cache.

    python benchmarks/vision.py [--part train,generate] [--variant S/16] [--image-size 224] [--batch 16] [--quick]

train: one step (forward, backward, Adam) of `seqjax.models.ViT` (float32, 1000 classes, random images and
  labels), jit-compiled with parameters and optimizer state donated; median of interleaved rounds beside a 2048^3
  `jnp.dot` timed in the same run. Model FLOPs per step = 6 * P_matmul * B * T + 3 * L * 4 * B * T^2 * D, with
  T = patches + 1 and P_matmul = L * (4 D^2 + 2 D M) + (P^2 C) D (patch embedding) + D K (head).
generate: `ImageTokenDecoder` (text 32 tokens, a 16 x 16 image-token grid, width 256, 4 layers, batch 4) drawing
  all 256 image tokens with `seqjax.decoding.sample` (KV cache, one jit-compiled loop), against recomputing the whole
  stream at every token (a full forward over the tokens so far, padded up to a multiple of 32 image tokens).
"""

from __future__ import annotations

import argparse
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import interleaved_medians, matmul_peak_step

from seqjax import decoding
from seqjax.models import ImageDecoderConfig, ImageTokenDecoder, ViT, vit_config
from seqjax.models.image_decoder import ImageStep, image_prompt, image_state


def part_train(args) -> None:
    cfg = vit_config(args.variant, num_classes=1000, image_size=args.image_size)
    model, opt = ViT(cfg), optax.adam(1e-4)
    b, s, c = args.batch, args.image_size, 3
    images = jax.random.uniform(jax.random.key(0), (b, s, s, c))
    labels = jax.random.randint(jax.random.key(1), (b,), 0, 1000)
    params = jax.jit(model.init)(jax.random.key(2), images[:1])["params"]
    state = [params, opt.init(params)]

    def step(params, opt_state):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, images), labels).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jitted = jax.jit(step, donate_argnums=(0, 1))

    def run():
        state[0], state[1] = jitted(state[0], state[1])
        jax.block_until_ready(state)

    n = args.peak_n
    peak_step, peak_flops = matmul_peak_step(n)
    times = interleaved_medians({"vit": run, "peak": peak_step}, args.repeats)
    peak = peak_flops / times["peak"] / 1e9
    d, m, layers, p = cfg.emb_dim, cfg.mlp_dim, cfg.num_layers, cfg.patch_size
    t = (s // p) ** 2 + 1
    p_matmul = layers * (4 * d * d + 2 * d * m) + p * p * c * d + d * 1000
    flops = 6 * p_matmul * b * t + 3 * layers * 4 * b * t * t * d
    ti = times["vit"]
    print(f"\n== ViT-{args.variant} train step: {s}x{s} images, batch {b}, f32, adam; median of {args.repeats}")
    rate = flops / ti / 1e9
    print(f"  {ti * 1e3:.1f} ms/step, {b / ti:.1f} images/s, {rate:.1f} GFLOP/s = {rate / peak:.2f} of peak")
    print(f"  (peak: the {n}^3 matmul, {peak:.0f} GFLOP/s in the same run)")


def part_generate(args) -> None:
    g = args.grid
    cfg = ImageDecoderConfig(
        text_vocab_size=1000, image_vocab_size=512, text_len=32, image_grid=(g, g), emb_dim=256, num_heads=4,
        num_layers=4, mlp_dim=1024,
    )  # fmt: skip
    model, b, n = ImageTokenDecoder(cfg), args.gen_batch, g * g
    text = jax.random.randint(jax.random.key(0), (b, 32), 1, 1000)
    image = jax.random.randint(jax.random.key(1), (b, n), 0, 512)
    params = jax.jit(model.init)(jax.random.key(2), text, image)["params"]
    prompt = image_prompt(model, text)
    step, key = ImageStep(model), jax.random.key(3)

    def cached():
        tokens = decoding.sample(step, image_state(model, params, b), prompt, key, n, top_k=64)
        return jax.block_until_ready(tokens)

    cached()
    t0 = time.perf_counter()
    tokens = cached()
    cached_s = time.perf_counter() - t0

    bucket = 32

    @jax.jit
    def full(params, text, image, j):  # logits for image token j from a full pass over the stream so far
        return model.apply({"params": params}, text, image)[1][:, j]

    def recompute():
        for j in range(n):  # the image tokens before j, padded up to a multiple of `bucket` (causal: exact)
            length = min(n, -(-(j + 1) // bucket) * bucket)
            seen = jnp.where(jnp.arange(length) < j, tokens[:, :length], 0)
            jax.block_until_ready(full(params, text, seen, j))

    recompute()
    t0 = time.perf_counter()
    recompute()
    recompute_s = time.perf_counter() - t0
    print(f"\n== image-token generation: {n} tokens ({g}x{g}), batch {b}, width 256, 4 layers, f32")
    print(f"  cached (one sample() loop): {cached_s:.3f} s = {b * n / cached_s:.0f} tokens/s")
    print(f"  recompute (full stream per token): {recompute_s:.3f} s = {b * n / recompute_s:.0f} tokens/s")
    print(f"  speed-up of the cache: {recompute_s / cached_s:.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="train,generate")
    p.add_argument("--variant", default="S/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grid", type=int, default=16, help="image-token grid side for generation")
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-n", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = p.parse_args()
    if args.quick:
        vars(args).update(variant="Mu/8", image_size=32, batch=2, grid=4, gen_batch=2, repeats=2, peak_n=256)
    print(f"jax {jax.__version__}, flax {flax.__version__}; {jax.devices()[0].platform}, {os.cpu_count()} cores")
    parts = set(args.part.split(","))
    if "train" in parts:
        part_train(args)
    if "generate" in parts:
        part_generate(args)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
