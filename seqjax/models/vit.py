"""Vision Transformer (Dosovitskiy et al. 2021): patches as tokens, the Transformer's encoder stack, a linear head.

Glossary: B batch, H x W image size, C channels, P patch size, h x w = H/P x W/P patch grid, D width, K classes.

The encoder blocks are the Transformer's own (`seqjax.models.transformer.EncoderBlock` under `LayerStack`), so
`scan_layers`, `remat_policy`, `dtype` and the attention implementation work the same way. Named variants follow
the ViT paper and its successors: `vit_config("S/16", num_classes=10)`.

Position embeddings are a table for the `image_size` grid ("learned") or computed for any grid ("sinusoidal");
a model given images of another size interpolates its learned table (bilinear) to the new grid, and
`resize_position_embedding` converts trained parameters for fine-tuning at a new resolution.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.models.config_base import check_positive_ints
from seqjax.models.transformer import (
    ATTENTION_IMPLEMENTATIONS,
    REMAT_POLICIES,
    EncoderBlock,
    LayerStack,
    StackConfig,
    TransformerConfig,
    stack_config,
)
from seqjax.nn.position import sinusoidal_positions_2d

Array = jax.Array

# name: (width D, layers, MLP width, heads), as in the ViT paper (Ti and S from DeiT).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Mu": (64, 4, 256, 2),  # tiny, for CPU tests and demos
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig(StackConfig):
    """The ViT's fields; the encoder stack's (emb_dim, num_heads, num_layers, mlp_dim, dropout_rate,
    attention_dropout_rate, dtype, param_dtype, scan_layers, remat_policy, attention_implementation) are
    `StackConfig`'s, with its defaults. Those are not ViT-B's widths (this class's defaults before it shared the
    stack's fields) and have dropout (0 here before): name a variant, `vit_config("B/16", ...)`, and give the dropout
    rates you want.

    Attributes:
    num_classes: K (0: no head; the model returns the pooled representation `[B, D]`).
    image_size: (H, W) (or one int) the position table is made for.
    patch_size: P.
    pool: "cls" (a learned class token, read out after the last layer) or "gap" (mean over patches).
    position: "learned", "sinusoidal" (2D) or "none".
    """

    num_classes: int
    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    pool: str = "cls"
    position: str = "learned"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"ViTConfig.pool={self.pool!r} is unknown; use 'cls' or 'gap'")
        if self.position not in ("learned", "sinusoidal", "none"):
            raise ValueError(f"ViTConfig.position={self.position!r} is unknown; use 'learned', 'sinusoidal', 'none'")
        if self.position == "sinusoidal" and self.emb_dim % 4:
            raise ValueError(f"ViTConfig.emb_dim={self.emb_dim} must be divisible by 4 for 2D sinusoidal positions")
        check_positive_ints(self, ("patch_size",))
        h, w = self.image_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size {(h, w)} must be divisible by ViTConfig.patch_size={self.patch_size}"
            )
        self.transformer_config()  # validates the shared fields, naming them

    @property
    def image_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    def transformer_config(self) -> TransformerConfig:
        """The encoder stack's config."""
        return stack_config(self, activation="gelu")


def vit_config(variant: str, **overrides) -> ViTConfig:
    """`"S/16"` → a `ViTConfig` with the S widths and 16-pixel patches; `overrides` set the other fields."""
    match = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant)
    if not match or match.group(1) not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; expected NAME/PATCH with NAME in {list(VARIANTS)}")
    d, layers, mlp, heads = VARIANTS[match.group(1)]
    fields = dict(emb_dim=d, num_layers=layers, mlp_dim=mlp, num_heads=heads, patch_size=int(match.group(2)))
    return ViTConfig(**{**fields, **overrides})


def resize_grid(table: Array, grid: tuple[int, int]) -> Array:
    """Bilinear interpolation of a position table `[h, w, D]` to `[grid[0], grid[1], D]` (identity at equal size)."""
    if tuple(table.shape[:2]) == tuple(grid):
        return table
    return jax.image.resize(table, (*grid, table.shape[-1]), method="bilinear", antialias=False)


def resize_position_embedding(params: Any, grid: tuple[int, int]) -> Any:
    """Trained ViT parameters → the same with the position table interpolated to `grid` (for a new resolution)."""
    params = jax.tree.map(lambda x: x, dict(params))  # shallow copy of the top level
    params["pos_embedding"] = resize_grid(params["pos_embedding"], grid)
    return params


class ViT(nn.Module):
    """`images [B, H, W, C] -> logits [B, K]` (or the pooled `[B, D]` when `num_classes == 0`)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        images = jnp.asarray(images)
        p = cfg.patch_size
        if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
            raise ValueError(
                f"ViT expects images [B, H, W, C] with H and W divisible by patch_size={p}, got {images.shape}"
            )
        b, hh, ww, _ = images.shape
        x = nn.Conv(
            cfg.emb_dim, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            name="patch_embed",
        )(images)  # [B, h, w, D]  # fmt: skip
        grid = (hh // p, ww // p)
        if cfg.position == "learned":
            table = self.param(
                "pos_embedding", nn.initializers.normal(stddev=0.02), (*cfg.grid, cfg.emb_dim), cfg.param_dtype
            )
            x = x + resize_grid(table, grid).astype(x.dtype)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions_2d(*grid, cfg.emb_dim, dtype=x.dtype)
        x = x.reshape(b, grid[0] * grid[1], cfg.emb_dim)  # [B, h*w, D], row-major patches
        if cfg.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, cfg.emb_dim), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.emb_dim)), x], axis=1)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        tcfg = cfg.transformer_config()
        x = LayerStack(tcfg, EncoderBlock, cfg.num_layers, name="stack")(x, None, deterministic=deterministic)
        x = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name="ln_final")(x.astype(jnp.float32))
        pooled = x[:, 0] if cfg.pool == "cls" else x.mean(axis=1)  # [B, D]
        if cfg.num_classes == 0:
            return pooled
        return nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros_init(), name="head")(pooled)


def attention_rollout(weights: list[Array]) -> Array:
    """Attention rollout (Abnar & Zuidema 2020): per layer, average the heads, add the residual identity and
    renormalise rows; multiply the layers in order. `weights`: per layer `[B, N, T, T]` → `[B, T, T]`, row i = how
    much output token i draws on each input token through the whole stack."""
    rollout = None
    for w in weights:
        a = jnp.asarray(w, jnp.float32).mean(axis=1)  # [B, T, T]
        a = a + jnp.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs at least one layer of weights")
    return rollout


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "REMAT_POLICIES",
    "VARIANTS",
    "ViT",
    "ViTConfig",
    "attention_rollout",
    "resize_grid",
    "resize_position_embedding",
    "vit_config",
]
