"""A discrete image tokenizer: convolutional encoder, vector quantiser, convolutional decoder (van den Oord 2017).

Glossary: B batch, H x W image, C channels, h x w = H/2^S x W/2^S latent grid (S stride-2 stages), D code width,
K codebook size.

The quantiser replaces each encoder vector by its nearest codebook entry. Gradients pass straight through
(z_q = z + stop_gradient(q - z)); a commitment loss β‖z - sg(q)‖² keeps the encoder near its codes; the codebook
itself is not trained by gradients but follows an exponential moving average of the vectors assigned to each code,
and codes whose average use falls below `restart_threshold` are restarted at random encoder outputs of the batch.
The codebook and its statistics live in the "vq" collection: pass `mutable=["vq"]` and an `rngs={"vq": key}` to
update them while training (`train=True`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.models.config_base import ConfigBase, check_positive_ints, check_rates

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VQVAEConfig(ConfigBase):
    """Attributes:
    num_codes: K.
    code_dim: D.
    channels: width of the convolutional stacks.
    num_downsamples: S stride-2 stages (latent grid = image / 2^S).
    image_channels: C.
    commitment: β of the commitment loss.
    decay: EMA decay of the codebook statistics, in [0, 1).
    restart_threshold: codes whose EMA count falls below it are restarted (0 disables restarts).
    res_blocks: residual blocks (x + conv1x1(relu(conv3x3(relu(x))))) at the latent resolution, after the encoder's
      middle convolution and after the decoder's: depth where it is cheap (the 8x8 grid), which sharpens small
      details (van den Oord et al. 2017 use 2).
    """

    num_codes: int = 64
    code_dim: int = 16
    channels: int = 32
    num_downsamples: int = 2
    image_channels: int = 3
    commitment: float = 0.25
    decay: float = 0.99
    restart_threshold: float = 0.01
    res_blocks: int = 0

    def __post_init__(self):
        check_positive_ints(self, ("num_codes", "code_dim", "channels", "num_downsamples", "image_channels"))
        if not isinstance(self.res_blocks, int) or self.res_blocks < 0:
            raise ValueError(f"VQVAEConfig.res_blocks must be an int >= 0, got {self.res_blocks!r}")
        check_rates(self, ("decay",))


class VectorQuantizer(nn.Module):
    """`(z [B..., D], train) -> (z_q [B..., D] with straight-through gradients, codes [B...] int32, aux)`;
    aux: "commitment_loss", "perplexity" (exp of the entropy of this batch's code usage), "usage" (fraction of
    codes used in this batch)."""

    num_codes: int
    commitment: float = 0.25
    decay: float = 0.99
    restart_threshold: float = 0.01
    eps: float = 1e-5

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
        k, d = self.num_codes, z.shape[-1]
        init_key = self.make_rng("params") if self.is_initializing() else None
        codebook = self.variable(
            "vq", "codebook", lambda: jax.random.uniform(init_key, (k, d), jnp.float32, -1.0 / k, 1.0 / k)
        )
        ema_count = self.variable("vq", "ema_count", lambda: jnp.ones((k,), jnp.float32))
        ema_sum = self.variable("vq", "ema_sum", lambda: codebook.value)
        flat = z.reshape(-1, d).astype(jnp.float32)  # [M, D]
        codes = nearest_code(flat, codebook.value)  # [M]
        onehot = jax.nn.one_hot(codes, k, dtype=jnp.float32)  # [M, K]
        q = codebook.value[codes]  # [M, D]
        counts = onehot.sum(axis=0)
        probs = counts / flat.shape[0]
        aux = {
            "commitment_loss": self.commitment * jnp.mean(jnp.sum((flat - jax.lax.stop_gradient(q)) ** 2, axis=-1)),
            "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
            "usage": jnp.mean(counts > 0),
        }
        if train and self.is_mutable_collection("vq") and not self.is_initializing():
            new = ema_update(
                codebook.value, ema_count.value, ema_sum.value, jax.lax.stop_gradient(flat), onehot, self.decay,
                self.eps,
            )  # fmt: skip
            if self.restart_threshold > 0:
                new = restart_dead_codes(*new, jax.lax.stop_gradient(flat), self.restart_threshold, self.make_rng("vq"))
            codebook.value, ema_count.value, ema_sum.value = new
        z_q = flat + jax.lax.stop_gradient(q - flat)  # straight-through
        return z_q.reshape(z.shape).astype(z.dtype), codes.reshape(z.shape[:-1]).astype(jnp.int32), aux

    def embed(self, codes: Array) -> Array:
        """Codes `[B...]` → their codebook vectors `[B..., D]`."""
        return self.get_variable("vq", "codebook")[codes]


def nearest_code(flat: Array, codebook: Array) -> Array:
    """Index of the nearest codebook row for each row of `flat [M, D]` (squared Euclidean distance)."""
    distances = (
        jnp.sum(flat**2, axis=-1, keepdims=True) - 2.0 * flat @ codebook.T + jnp.sum(codebook**2, axis=-1)[None, :]
    )  # [M, K]
    return jnp.argmin(distances, axis=-1)


def ema_update(codebook, ema_count, ema_sum, flat, onehot, decay, eps):
    """One EMA step: counts and sums of the vectors assigned to each code; codebook = sum / (Laplace-smoothed
    count). Returns (codebook, ema_count, ema_sum)."""
    del codebook
    ema_count = decay * ema_count + (1.0 - decay) * onehot.sum(axis=0)
    ema_sum = decay * ema_sum + (1.0 - decay) * (onehot.T @ flat)
    n = ema_count.sum()
    smoothed = (ema_count + eps) / (n + ema_count.shape[0] * eps) * n
    return ema_sum / smoothed[:, None], ema_count, ema_sum


def restart_dead_codes(codebook, ema_count, ema_sum, flat, threshold, rng):
    """Codes with `ema_count < threshold` move to random rows of `flat` (count reset to 1)."""
    dead = ema_count < threshold  # [K]
    picks = flat[jax.random.randint(rng, (codebook.shape[0],), 0, flat.shape[0])]  # [K, D]
    codebook = jnp.where(dead[:, None], picks, codebook)
    ema_count = jnp.where(dead, 1.0, ema_count)
    ema_sum = jnp.where(dead[:, None], picks, ema_sum)
    return codebook, ema_count, ema_sum


def _res_blocks(x: Array, config: VQVAEConfig, prefix: str) -> Array:
    """`config.res_blocks` residual blocks on x (>= 0, after a ReLU), then a ReLU (a no-op without blocks)."""
    for i in range(config.res_blocks):
        h = nn.Conv(config.channels, (3, 3), padding="SAME", name=f"{prefix}_res_{i}_a")(nn.relu(x))
        x = x + nn.Conv(config.channels, (1, 1), name=f"{prefix}_res_{i}_b")(nn.relu(h))
    return nn.relu(x)


class _Encoder(nn.Module):
    config: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        for i in range(cfg.num_downsamples):
            x = nn.relu(nn.Conv(cfg.channels, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"down_{i}")(x))
        x = nn.relu(nn.Conv(cfg.channels, (3, 3), padding="SAME", name="mid")(x))
        x = _res_blocks(x, cfg, "enc")
        return nn.Conv(cfg.code_dim, (1, 1), name="to_code")(x)  # [B, h, w, D]


class _Decoder(nn.Module):
    config: VQVAEConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        x = nn.relu(nn.Conv(cfg.channels, (3, 3), padding="SAME", name="mid")(z))
        x = _res_blocks(x, cfg, "dec")
        for i in range(cfg.num_downsamples):
            last = i == cfg.num_downsamples - 1
            x = nn.ConvTranspose(
                cfg.image_channels if last else cfg.channels, (4, 4), strides=(2, 2), padding="SAME", name=f"up_{i}"
            )(x)
            x = x if last else nn.relu(x)
        return x  # [B, H, W, C]


class VQVAE(nn.Module):
    """`(images [B, H, W, C], train=False) -> (reconstructions, aux)`; aux holds "codes" `[B, h, w]`,
    "reconstruction_loss" (mean squared error), "commitment_loss", "loss" (their sum), "perplexity", "usage".
    `encode(images) -> codes [B, h, w]`, `decode(codes) -> images`."""

    config: VQVAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = _Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.commitment, cfg.decay, cfg.restart_threshold)
        self.decoder = _Decoder(cfg)

    def _check(self, images: Array) -> Array:
        images = jnp.asarray(images)
        f = 2**self.config.num_downsamples
        if (
            images.ndim != 4
            or images.shape[1] % f
            or images.shape[2] % f
            or images.shape[3] != self.config.image_channels
        ):
            raise ValueError(
                f"VQVAE expects images [B, H, W, {self.config.image_channels}] with H and W divisible by {f}, got "
                f"{images.shape}"
            )
        return images

    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Any]]:
        images = self._check(images)
        z_q, codes, aux = self.quantizer(self.encoder(images), train)
        recon = self.decoder(z_q)
        rec_loss = jnp.mean((recon - images) ** 2)
        return recon, {
            **aux,
            "codes": codes,
            "reconstruction_loss": rec_loss,
            "loss": rec_loss + aux["commitment_loss"],
        }

    def encode(self, images: Array) -> Array:
        """`[B, H, W, C]` → codes `[B, h, w]` (int32)."""
        return self.quantizer(self.encoder(self._check(images)), False)[1]

    def decode(self, codes: Array) -> Array:
        """Codes `[B, h, w]` → images `[B, H, W, C]`."""
        codes = jnp.asarray(codes)
        if not jnp.issubdtype(codes.dtype, jnp.integer) or codes.ndim != 3:
            raise ValueError(f"VQVAE.decode expects integer codes [B, h, w], got {codes.shape} {codes.dtype}")
        return self.decoder(self.quantizer.embed(codes))
