"""DALL-E-style text-to-image decoder: one causal Transformer over [text tokens, begin-of-image, image tokens].

Glossary: B batch, Lt text length (`text_len`), h x w image-token grid, N = h*w image tokens, S = Lt + 1 + N stream
length, D width, Vt text vocabulary (0 = padding), K image vocabulary (the VQ-VAE's codebook size).

Stream position p holds text token p for p < Lt, the begin-of-image token (id Vt in the text table) at p = Lt, and
image token p - Lt - 1 after it. Text positions have their own learned embeddings; image tokens get a learned row
embedding plus a learned column embedding. The output at p predicts the token at p + 1: `text_logits` `[B, Lt-1,
Vt]` predict text tokens 1..Lt-1, `image_logits` `[B, N, K]` (outputs at the begin-of-image token and the image
tokens but the last) predict image tokens 0..N-1. The loss weights the image part by `image_loss_weight` (DALL-E:
7/8).

Generation (`seqjax.decoding`): `ImageStep(model)` over `image_state(...)` reads the caption plus the
begin-of-image token in one prefill call, then one image token per call, returning image logits, so `greedy`,
`sample` (top-k / top-p / temperature) and `beam_search` produce the N image tokens; the VQ-VAE decodes them to
pixels. `guidance_scale` in `image_state` turns on classifier-free guidance: an unconditional copy of every stream
(empty caption; trained with `caption_dropout`) runs beside it and the logits become u + s (c - u).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.models.config_base import check_positive_ints, check_rates
from seqjax.models.transformer import DecoderBlock, LayerStack, StackConfig, TransformerConfig, stack_config
from seqjax.models.transformer_steps import CachedStep, empty_cache, with_decode

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ImageDecoderConfig(StackConfig):
    """The decoder's fields; the block stack's (emb_dim, num_heads, num_layers, mlp_dim, dropout_rate,
    attention_dropout_rate, dtype, param_dtype, scan_layers, remat_policy, attention_implementation) are
    `StackConfig`'s, with its defaults. Before it shared them this class had emb_dim=256, num_heads=4, num_layers=4,
    mlp_dim=1024 and no dropout: give those to get that model.

    Attributes:
    text_vocab_size: Vt (id 0 is padding; the begin-of-image token gets id Vt in the text table).
    image_vocab_size: K.
    text_len: Lt.
    image_grid: (h, w) of image tokens.
    image_loss_weight: weight of the image tokens' loss (the text's gets 1 - it).
    caption_dropout: probability, in training, of replacing a caption by padding (for classifier-free guidance).
    decode: as in `TransformerConfig`.
    """

    text_vocab_size: int
    image_vocab_size: int
    text_len: int = 16
    image_grid: tuple[int, int] = (8, 8)
    image_loss_weight: float = 7.0 / 8.0
    caption_dropout: float = 0.0
    decode: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(self, ("text_vocab_size", "image_vocab_size", "text_len"))
        if len(self.image_grid) != 2 or min(self.image_grid) < 1:
            raise ValueError(f"ImageDecoderConfig.image_grid must be (h, w) >= 1, got {self.image_grid!r}")
        check_rates(self, ("image_loss_weight", "caption_dropout"), include_one=True)
        self.transformer_config()

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def stream_len(self) -> int:
        return self.text_len + 1 + self.num_image_tokens

    def transformer_config(self) -> TransformerConfig:
        """The block stack's config."""
        return stack_config(self, max_len=self.stream_len, decode=self.decode)


def _check_ids(ids: Array, vocab: int, name: str, length: int | None = None) -> Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer ids [B, L], got shape {ids.shape} dtype {ids.dtype}")
    if length is not None and ids.shape[1] > length:
        raise ValueError(f"{name} has length {ids.shape[1]} > the model's {length} (shape {ids.shape})")
    if not isinstance(ids, jax.core.Tracer):  # values are known: check them here, not as NaN later
        values = np.asarray(ids)  # numpy: under a trace, jnp ops on a concrete array would give tracers
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} ids must be in [0, {vocab}), got values in [{lo}, {hi}]")
    return ids


class ImageTokenDecoder(nn.Module):
    """`(text [B, Lt'], image [B, N']) -> (text_logits [B, Lt-1, Vt], image_logits [B, N', K])` with Lt' <= Lt (the
    caption is padded to Lt) and N' <= N (the first N' image tokens, row-major); with `config.decode`,
    `(tokens [B, T]) -> image logits [B, T, K]` at the next T stream positions (see the module docstring)."""

    config: ImageDecoderConfig

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(stddev=0.02)
        h, w = cfg.image_grid
        self.text_embed = nn.Embed(cfg.text_vocab_size + 1, cfg.emb_dim, embedding_init=init, dtype=cfg.dtype)
        self.image_embed = nn.Embed(cfg.image_vocab_size, cfg.emb_dim, embedding_init=init, dtype=cfg.dtype)
        self.text_pos = self.param("text_pos", init, (cfg.text_len + 1, cfg.emb_dim), cfg.param_dtype)
        self.row_pos = self.param("row_pos", init, (h, cfg.emb_dim), cfg.param_dtype)
        self.col_pos = self.param("col_pos", init, (w, cfg.emb_dim), cfg.param_dtype)
        self.stack = LayerStack(cfg.transformer_config(), DecoderBlock, cfg.num_layers)
        self.ln_final = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32)
        self.text_head = nn.Dense(cfg.text_vocab_size, dtype=jnp.float32)
        self.image_head = nn.Dense(cfg.image_vocab_size, dtype=jnp.float32)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        if cfg.decode:
            self.index = self.variable("cache", "stream_index", lambda: jnp.array(-1, jnp.int32))

    def embed(self, tokens: Array, start: Array | int) -> Array:
        """Stream tokens `[B, T]` at positions start..start+T-1 → `[B, T, D]`, each through the table of its part."""
        cfg = self.config
        pos = start + jnp.arange(tokens.shape[1])  # [T]
        is_text = pos <= cfg.text_len  # text and the begin-of-image token
        text_ids = jnp.where(is_text, tokens, 0)
        image_ids = jnp.where(is_text, 0, tokens)
        image_pos = jnp.clip(pos - cfg.text_len - 1, 0, cfg.num_image_tokens - 1)
        w = cfg.image_grid[1]
        text_part = self.text_embed(text_ids) + self.text_pos[jnp.minimum(pos, cfg.text_len)].astype(cfg.dtype)
        image_part = self.image_embed(image_ids) + (self.row_pos[image_pos // w] + self.col_pos[image_pos % w]).astype(
            cfg.dtype
        )
        return jnp.where(is_text[None, :, None], text_part, image_part)

    def _run(self, x: Array, mask: Array | None, deterministic: bool) -> Array:
        x = self.dropout(x, deterministic=deterministic)
        x = self.stack(x, None, mask, None, deterministic=deterministic)
        return self.ln_final(x.astype(jnp.float32))  # float32 statistics and heads

    def __call__(self, text: Array, image: Array | None = None, deterministic: bool = True):
        cfg = self.config
        if cfg.decode:
            return self._decode(text, deterministic)
        text = _check_ids(text, cfg.text_vocab_size, "text (caption)", cfg.text_len)
        text = jnp.pad(text, ((0, 0), (0, cfg.text_len - text.shape[1])))  # [B, Lt]
        image = _check_ids(image, cfg.image_vocab_size, "image tokens", cfg.num_image_tokens)
        if image.shape[1] < 1:
            raise ValueError(f"image tokens must be [B, N'] with 1 <= N' <= {cfg.num_image_tokens}, got {image.shape}")
        b = text.shape[0]
        boi = jnp.full((b, 1), cfg.text_vocab_size, text.dtype)
        stream = jnp.concatenate([text, boi, image[:, :-1].astype(text.dtype)], axis=1)  # [B, S-1]
        x = self._run(self.embed(stream, 0), None, deterministic)  # DecoderBlock is causal (is_causal)
        text_logits = self.text_head(x[:, : cfg.text_len - 1])
        image_logits = self.image_head(x[:, cfg.text_len :])
        return text_logits, image_logits

    def _decode(self, tokens: Array, deterministic: bool) -> Array:
        tokens = jnp.asarray(tokens)
        if not self.has_variable("cache", "stream_index") or self.is_initializing():
            # init: create the caches over a whole stream.
            return self.image_head(self._run(self.embed(tokens, 0), None, deterministic))
        start = self.index.value + 1
        self.index.value = start + tokens.shape[1] - 1
        return self.image_head(self._run(self.embed(tokens, start), None, deterministic))

    def loss(self, text: Array, image: Array, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
        """Weighted cross-entropy: (1 - w) * text (padding excluded) + w * image, w = `image_loss_weight`.

        Returns `(loss, aux)`: aux holds both means ("text_loss", "image_loss") and, for reducing over devices or
        batches before dividing, their sums and token counts ("text_sum", "text_tokens", "image_sum",
        "image_tokens")."""
        cfg = self.config
        text = jnp.asarray(text)
        text = jnp.pad(text, ((0, 0), (0, cfg.text_len - text.shape[1])))
        if not deterministic and cfg.caption_dropout > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), cfg.caption_dropout, (text.shape[0], 1))
            text = jnp.where(drop, 0, text)
        text_logits, image_logits = self(text, image, deterministic)
        image_nll = _nll(image_logits, image)
        text_nll = _nll(text_logits, text[:, 1:])
        valid = (text[:, 1:] > 0).astype(jnp.float32)
        text_sum, text_tokens = jnp.sum(text_nll * valid), valid.sum()
        text_loss = text_sum / jnp.maximum(text_tokens, 1.0)
        image_sum, image_tokens = image_nll.sum(), jnp.asarray(image_nll.size, jnp.float32)
        image_loss = image_sum / image_tokens
        w = cfg.image_loss_weight
        aux = {"text_loss": text_loss, "image_loss": image_loss, "text_sum": text_sum, "text_tokens": text_tokens,
               "image_sum": image_sum, "image_tokens": image_tokens}  # fmt: skip
        return (1.0 - w) * text_loss + w * image_loss, aux


def _nll(logits: Array, labels: Array) -> Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ------------------------------------------------------------------------------------------------------------------
# Generation through seqjax.decoding
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageStep(CachedStep):
    """Step function over `image_state(...)`: prefill with `image_prompt(text)`, then image tokens."""

    model: ImageTokenDecoder

    def __call__(self, state: Any, tokens: Array) -> tuple[Array, Any]:
        model, scale = with_decode(self.model), state["guidance_scale"]
        guided = scale is not None
        if guided:  # the unconditional copy reads an empty caption and the same image tokens
            text_len = self.model.config.text_len
            pos = jnp.arange(tokens.shape[1]) + (state["cache"]["stream_index"] + 1)
            uncond = jnp.where(pos < text_len, 0, tokens)
            tokens = jnp.concatenate([tokens, uncond], axis=0)
        logits, new = model.apply({"params": state["params"], "cache": state["cache"]}, tokens, mutable=["cache"])
        if guided:
            cond, uncond = jnp.split(logits, 2, axis=0)
            logits = uncond + scale * (cond - uncond)
        return logits, {**state, "cache": new["cache"]}

    def batch_axes(self, state: Any) -> Any:
        if state["guidance_scale"] is not None:
            raise ValueError("beam search with classifier-free guidance is not supported; use greedy or sample")
        return super().batch_axes(state)


def image_prompt(model: ImageTokenDecoder, text: Array) -> Array:
    """The prefill tokens: the caption padded to `text_len`, then the begin-of-image token: `[B, Lt + 1]`."""
    cfg = model.config
    text = _check_ids(text, cfg.text_vocab_size, "text (caption)", cfg.text_len)
    text = jnp.pad(text, ((0, 0), (0, cfg.text_len - text.shape[1])))
    return jnp.concatenate([text, jnp.full((text.shape[0], 1), cfg.text_vocab_size, text.dtype)], axis=1)


def image_state(model: ImageTokenDecoder, params: Any, batch_size: int, guidance_scale: float | None = None) -> dict:
    """An empty cache for a whole stream (twice the batch with guidance), with the parameters."""
    rows = batch_size * (1 if guidance_scale is None else 2)
    cache = empty_cache(with_decode(model), jnp.zeros((rows, model.config.stream_len), jnp.int32))
    cache["stream_index"] = jnp.array(-1, jnp.int32)
    return {"params": params, "cache": cache, "guidance_scale": guidance_scale}
