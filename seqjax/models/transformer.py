"""The Transformer family: encoder-decoder, encoder-only stack, decoder-only language model.

Vaswani et al. 2017: an encoder (self-attention, then a feed-forward block, per layer) and a decoder whose layers
attend causally to themselves and then to the topmost encoder's output. Pre-LN (the default, stable without warm-up
tricks) or post-LN (the original paper). Every model takes one frozen `TransformerConfig`.

Glossary: B batch, S source length, T target length, D width (`emb_dim`), N heads, K key/value heads, M MLP width,
V vocabulary, L layers. Token id 0 is padding (and the decoder's start-of-sequence token after the shift right).

Layer stacks: with `scan_layers=False` the blocks are submodules `layers_0 ... layers_{L-1}`; with `scan_layers=True`
one submodule `layers` holds every parameter with a leading `[L]` axis and `nn.scan` runs it, so the traced program
has one block whatever the depth. `stack_layers` / `unstack_layers` convert parameters (and caches) between the
two layouts. `remat_policy` recomputes activations in the backward pass (see `REMAT_POLICIES`).

Cached decoding follows Flax's convention: `decode=True`, a "cache" collection created by `init` on tokens
`[B, max_decode_len]`, then one call per step with `mutable=["cache"]`; positions come from the cache (rotary ones
from each attention's cache index).

Positions are added to the token embeddings ("sinusoidal", "learned") or rotate the queries and keys of every
self-attention ("rope", as in Llama; cross-attention has none). `num_kv_heads` < `num_heads` is grouped-query
attention: the KV caches hold K heads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict, unfreeze

# The configuration lives in transformer_config.py; its names are re-exported here, where they were first defined.
from seqjax.models.transformer_config import (
    ACTIVATIONS,
    ATTENTION_IMPLEMENTATIONS,
    POSITIONS,
    REMAT_POLICIES,
    STACK_FIELDS,
    StackConfig,
    TransformerConfig,
    check_tokens,
    stack_config,
)
from seqjax.nn.attention import MultiHeadAttention
from seqjax.nn.mlp import MlpBlock
from seqjax.nn.norm import LayerNorm
from seqjax.nn.position import AddSinusoidalPositions, LearnedPositionEmbedding

Array = jax.Array
Dtype = Any


# ------------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------------


def _layer_norm(config: TransformerConfig, name: str) -> Callable[[Array], Array]:
    """LayerNorm with float32 statistics whatever the compute dtype (output cast back to it)."""
    # flax's parameters and formula; the backward pass keeps the input and two statistics (seqjax.nn.norm).
    norm = LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name=name)  # float32 scale and bias too
    return lambda x: norm(x.astype(jnp.float32)).astype(config.dtype)


def _attention(config: TransformerConfig, name: str, decode: bool = False, cross: bool = False) -> MultiHeadAttention:
    """A self-attention (rotary with `position="rope"`) or, with `cross`, a cross-attention sublayer."""
    return MultiHeadAttention(
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        rope_base=config.rope_base if config.position == "rope" and not cross else None,
        qkv_features=config.attention_dim,
        dropout_rate=config.attention_dropout_rate,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        decode=decode,
        implementation=config.attention_implementation,
        name=name,
    )


def _rotary(config: TransformerConfig, positions: Array | None) -> dict:
    """The self-attention's `positions` argument: given positions (packed rows) reach it only with rotary ones."""
    return {"positions": positions} if config.position == "rope" and positions is not None else {}


class _Sublayers(nn.Module):
    """Shared residual wiring: pre-LN `x + drop(f(LN(x)))` or post-LN `LN(x + drop(f(x)))`."""

    config: TransformerConfig

    def residual(self, x: Array, f: Callable[[Array], Array], norm: str, deterministic: bool) -> Array:
        cfg = self.config
        if cfg.pre_norm:
            y = f(_layer_norm(cfg, norm)(x))
            return x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        y = nn.Dropout(cfg.dropout_rate)(f(x), deterministic=deterministic)
        return _layer_norm(cfg, norm)(x + y)

    def mlp(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        block = MlpBlock(
            cfg.mlp_dim,
            activation=ACTIVATIONS[cfg.activation],
            dropout_rate=cfg.dropout_rate,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="mlp",
        )
        return self.residual(x, lambda y: block(y, deterministic), "ln_mlp", deterministic)


class EncoderBlock(_Sublayers):
    """Self-attention, then the MLP, each in a residual branch.
    `(x [B, S, D], mask, deterministic, segment_ids [B, S] | None, positions [B, S] | None) -> [B, S, D]`."""

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        deterministic: bool = True,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        attn = _attention(self.config, "self_attention")
        kw = dict(mask=mask, deterministic=deterministic, segment_ids=segment_ids, **_rotary(self.config, positions))
        x = self.residual(x, lambda y: attn(y, **kw), "ln_self", deterministic)
        return self.mlp(x, deterministic)


class DecoderBlock(_Sublayers):
    """Causal self-attention (`is_causal`, no [T, T] mask; cached when `config.decode`), cross-attention to
    `encoded` (skipped when it is None, as in a decoder-only model), then the MLP.

    `(x [B, T, D], encoded [B, S, D] | None, self_mask, cross_mask, deterministic, segment_ids [B, T] | None,
    positions [B, T] | None) -> [B, T, D]`; `self_mask` (usually None) and `segment_ids` (packed sequences) AND with
    causality; `positions` are the rotary ones (with `position="rope"`).
    """

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array | None,
        self_mask: Array | None,
        cross_mask: Array | None,
        deterministic: bool = True,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        cfg = self.config
        attn = _attention(cfg, "self_attention", decode=cfg.decode)
        kw = dict(mask=self_mask, deterministic=deterministic, is_causal=True, segment_ids=segment_ids)
        kw.update(_rotary(cfg, positions))
        x = self.residual(x, lambda y: attn(y, **kw), "ln_self", deterministic)
        if encoded is not None:
            cross = _attention(cfg, "cross_attention", cross=True)
            x = self.residual(
                x, lambda y: cross(y, encoded, mask=cross_mask, deterministic=deterministic), "ln_cross", deterministic
            )
        return self.mlp(x, deterministic)


class LayerStack(nn.Module):
    """L blocks, unrolled (`layers_i`) or scanned (`layers`, stacked parameters), optionally rematerialised.

    `block_args` are broadcast to every layer; `deterministic` is static; `segment_ids` and `positions` (packed
    sequences), when given, follow it.
    """

    config: TransformerConfig
    block: type[nn.Module]
    num_layers: int

    @nn.compact
    def __call__(
        self,
        x: Array,
        *block_args,
        deterministic: bool = True,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        cfg = self.config
        block = self.block
        static = 2 + len(block_args)  # position of `deterministic` counting self
        trailing = () if segment_ids is None and positions is None else (segment_ids, positions)
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], static_argnums=(static,))
        if not cfg.scan_layers:
            for i in range(self.num_layers):
                x = block(cfg, name=f"layers_{i}")(x, *block_args, deterministic, *trailing)
            return x

        def body(module, carry, _):
            return module(carry, *block_args, deterministic, *trailing), None

        scan = nn.scan(
            body,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.num_layers,
        )
        x, _ = scan(block(cfg, name="layers"), x, None)
        return x


# ------------------------------------------------------------------------------------------------------------------
# Embeddings and outputs
# ------------------------------------------------------------------------------------------------------------------


class _PositionCounter(nn.Module):
    """The decode-time position counter ("cache"/"position_index"): returns the positions of the next T tokens
    `[T]` and advances by T; at `init` (cache creation) it returns None (positions 0..T-1)."""

    @nn.compact
    def __call__(self, t: int) -> Array | None:
        initialized = self.has_variable("cache", "position_index")
        index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return None
        positions = index.value + jnp.arange(t)  # [T]
        index.value = index.value + t
        return positions


class Embed(nn.Module):
    """Token embedding plus positions ("sinusoidal" or "learned"; none for "rope") plus dropout:
    `tokens [B, T] -> [B, T, D]`.

    With `config.decode` the positions come from a "cache" counter that advances by T per call, so a prompt
    prefilled in one call and the tokens fed after it get the positions a full pass would give them.
    """

    config: TransformerConfig
    vocab_size: int
    embedding: nn.Embed | None = None  # shared with another module (share_embeddings)

    def setup(self):
        cfg = self.config
        self.table = self.embedding or nn.Embed(
            self.vocab_size,
            cfg.emb_dim,
            embedding_init=nn.initializers.normal(stddev=1.0),
            param_dtype=cfg.param_dtype,
            dtype=cfg.dtype,
        )
        if cfg.position == "learned":
            self.positions = LearnedPositionEmbedding(cfg.max_len, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        elif cfg.position == "sinusoidal":
            self.positions = AddSinusoidalPositions(dtype=cfg.dtype)
        if cfg.decode:
            self.counter = _PositionCounter()
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, tokens: Array, deterministic: bool = True, positions: Array | None = None) -> Array:
        """`positions` int `[B, T]` (packed sequences restart at 0; default 0..T-1) are not taken with decode."""
        cfg = self.config
        x = self.table(tokens)  # [B, T, D]
        if cfg.decode and positions is not None:
            raise ValueError("Embed: positions come from the cache with config.decode; do not pass them")
        if cfg.position in ("sinusoidal", "learned"):  # "rope" rotates inside each self-attention instead
            positions = self.counter(tokens.shape[1]) if cfg.decode else positions
            x = self.positions(x, positions)
        return self.dropout(x, deterministic=deterministic)

    def attend(self, x: Array) -> Array:
        """Logits through the transposed embedding, scaled by 1/sqrt(D): `[B, T, D] -> [B, T, V]` (float32)."""
        table = self.table.embedding.astype(jnp.float32)  # nn.Embed.attend would compute in the compute dtype
        return jnp.dot(x.astype(jnp.float32) / jnp.sqrt(jnp.float32(self.config.emb_dim)), table.T)


def _logits(config: TransformerConfig, embed: Embed, x: Array, vocab: int) -> Array:
    if config.tie_embeddings:
        return embed.attend(x)
    return nn.Dense(vocab, dtype=jnp.float32, param_dtype=config.param_dtype, name="logits")(x)


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Token ids `[B, S]` → encodings `[B, S, D]`; padding (id 0) is masked out of every attention, as segment 0
    (no [S, S] mask is built); padded positions' attention outputs are zeros, as with `padding_mask`."""

    config: TransformerConfig
    shared_embedding: nn.Embed | None = None

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        inputs = check_tokens(cfg, inputs, "inputs")
        segments = (inputs > 0).astype(jnp.int32)  # [B, S]: 1 real, 0 padding (attends to and is seen by nothing)
        x = Embed(cfg.replace(decode=False), cfg.vocab_size, self.shared_embedding, name="embed")(inputs, deterministic)
        stack = LayerStack(cfg, EncoderBlock, cfg.num_layers, name="stack")
        x = stack(x, None, deterministic=deterministic, segment_ids=segments)
        if cfg.pre_norm:
            x = _layer_norm(cfg, "ln_final")(x)
        return x


class Decoder(nn.Module):
    """Target ids `[B, T]` and encodings → logits `[B, T, V]` (teacher forcing: targets are shifted right inside,
    except with `config.decode`, where the caller feeds the previous token, starting with 0)."""

    config: TransformerConfig
    shared_embedding: nn.Embed | None = None

    @nn.compact
    def __call__(self, encoded: Array, inputs: Array, targets: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        targets = check_tokens(cfg, targets, "targets")
        if not cfg.decode:
            targets = shift_right(targets)
        cross_mask = (jnp.asarray(inputs) > 0)[:, None, None, :]  # [B, 1, 1, S]: keys that are not padding
        embed = Embed(cfg, cfg.target_vocab_size, self.shared_embedding, name="embed")
        x = embed(targets, deterministic)
        x = LayerStack(cfg, DecoderBlock, cfg.decoder_layers, name="stack")(
            x, encoded, None, cross_mask, deterministic=deterministic
        )  # self-attention is causal by `is_causal` (the cache masks itself)
        if cfg.pre_norm:
            x = _layer_norm(cfg, "ln_final")(x)
        return _logits(cfg, embed, x, cfg.target_vocab_size)


class Transformer(nn.Module):
    """Encoder-decoder Transformer. `(inputs [B, S], targets [B, T]) -> logits [B, T, V]`, plus `encode` and
    `decode` for generation (see `seqjax.decoding`)."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        shared = None
        if cfg.share_embeddings:
            shared = nn.Embed(
                cfg.vocab_size, cfg.emb_dim, embedding_init=nn.initializers.normal(stddev=1.0),
                param_dtype=cfg.param_dtype, dtype=cfg.dtype, name="shared_embedding",
            )  # fmt: skip
        self.encoder = Encoder(cfg, shared)
        self.decoder = Decoder(cfg, shared)

    def encode(self, inputs: Array, deterministic: bool = True) -> Array:
        """`[B, S]` → `[B, S, D]`."""
        return self.encoder(inputs, deterministic)

    def decode(self, encoded: Array, inputs: Array, targets: Array, deterministic: bool = True) -> Array:
        """Encodings `[B, S, D]`, the source ids `[B, S]` (for the padding mask) and targets `[B, T]` → logits."""
        return self.decoder(encoded, inputs, targets, deterministic)

    def __call__(self, inputs: Array, targets: Array, deterministic: bool = True) -> Array:
        return self.decode(self.encode(inputs, deterministic), inputs, targets, deterministic)


class DecoderLM(nn.Module):
    """Decoder-only language model: `tokens [B, T] -> logits [B, T, V]`, where `logits[:, t]` depends only on
    `tokens[:, :t+1]` and predicts `tokens[:, t+1]` (no shift inside).

    Packed rows (`seqjax.data.pipeline.pack`): `segment_ids [B, T]` (1, 2, ... per sequence, 0 padding) keep each
    sequence's attention within itself and `positions [B, T]` restart at 0 per sequence, so each sequence gets the
    logits it would get alone (`seqjax.data.pipeline.packed_lm_targets` gives the labels and weights)."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        deterministic: bool = True,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        cfg = self.config
        if cfg.num_decoder_layers not in (None, cfg.num_layers):
            raise ValueError(
                f"TransformerConfig.num_decoder_layers={cfg.num_decoder_layers} is for the encoder-decoder "
                f"Transformer; DecoderLM has num_layers={cfg.num_layers} layers"
            )
        tokens = check_tokens(cfg, tokens, "tokens")
        embed = Embed(cfg, cfg.vocab_size, name="embed")
        x = embed(tokens, deterministic, positions)
        x = LayerStack(cfg, DecoderBlock, cfg.num_layers, name="stack")(
            x, None, None, None, deterministic=deterministic, segment_ids=segment_ids, positions=positions
        )  # causal by `is_causal`: no [T, T] mask
        if cfg.pre_norm:
            x = _layer_norm(cfg, "ln_final")(x)
        return _logits(cfg, embed, x, cfg.vocab_size)


def shift_right(tokens: Array) -> Array:
    """`[B, T]` → `[B, T]` with a 0 (start) in front and the last token dropped."""
    return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


# ------------------------------------------------------------------------------------------------------------------
# Stacked <-> unstacked layer parameters
# ------------------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers_(\d+)$")


def stack_layers(tree: Any) -> dict:
    """Unscanned variables (`layers_0 ... layers_{L-1}` in any dict) → scanned ones (`layers`, leading `[L]`)."""
    tree = unfreeze(tree) if isinstance(tree, FrozenDict) else tree
    if not isinstance(tree, dict):
        return tree
    out, layers = {}, {}
    for key, value in tree.items():
        match = _LAYER.match(key)
        if match:
            layers[int(match.group(1))] = stack_layers(value)
        else:
            out[key] = stack_layers(value)
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"stack_layers: layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(len(layers))))
    return out


def unstack_layers(tree: Any) -> dict:
    """Scanned variables (`layers` with a leading `[L]` axis) → unscanned ones (`layers_0 ... layers_{L-1}`)."""
    tree = unfreeze(tree) if isinstance(tree, FrozenDict) else tree
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers":
            n = jax.tree.leaves(value)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = unstack_layers(jax.tree.map(lambda x, i=i: x[i], value))
        else:
            out[key] = unstack_layers(value)
    return out


__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLEMENTATIONS",
    "POSITIONS",
    "REMAT_POLICIES",
    "STACK_FIELDS",
    "Decoder",
    "DecoderBlock",
    "DecoderLM",
    "Embed",
    "Encoder",
    "EncoderBlock",
    "StackConfig",
    "Transformer",
    "TransformerConfig",
    "check_tokens",
    "shift_right",
    "stack_config",
    "stack_layers",
    "unstack_layers",
]
