"""The Transformer family: encoder-decoder, encoder-only stack, decoder-only language model.

Vaswani et al. 2017: an encoder (self-attention, then a feed-forward block, per layer) and a decoder whose layers
attend causally to themselves and then to the topmost encoder's output. Pre-LN (the default, stable without warm-up
tricks) or post-LN (the original paper). Every model takes one frozen `TransformerConfig`.

Glossary: B batch, S source length, T target length, D width (`emb_dim`), N heads, M MLP width, V vocabulary,
L layers. Token id 0 is padding (and the decoder's start-of-sequence token after the shift right).

Layer stacks: with `scan_layers=False` the blocks are submodules `layers_0 ... layers_{L-1}`; with `scan_layers=True`
one submodule `layers` holds every parameter with a leading `[L]` axis and `nn.scan` runs it, so the traced program
has one block whatever the depth. `stack_layers` / `unstack_layers` convert parameters (and caches) between the
two layouts. `remat_policy` recomputes activations in the backward pass (see `REMAT_POLICIES`).

Cached decoding follows Flax's convention: `decode=True`, a "cache" collection created by `init` on tokens
`[B, max_decode_len]`, then one call per step with `mutable=["cache"]`; positions come from the cache.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict, unfreeze

from seqjax import kernels
from seqjax.models._config import ConfigBase, check_positive_ints, check_rates
from seqjax.nn.attention import MultiHeadAttention
from seqjax.nn.mlp import MlpBlock
from seqjax.nn.norm import LayerNorm
from seqjax.nn.position import AddSinusoidalPositions, LearnedPositionEmbedding

Array = jax.Array
Dtype = Any

# Name → policy passed to `jax.checkpoint` ("none": no remat; "full": save nothing, recompute the block).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
POSITIONS = ("sinusoidal", "learned", "none")
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}
ATTENTION_IMPLEMENTATIONS = kernels.NAMES  # seqjax.kernels.registry; "auto" chooses per platform


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ConfigBase):
    """Every hyperparameter of the Transformer models; derive variants with `config.replace(...)`.

    Attributes:
      vocab_size: V of the inputs (the encoder's, or the decoder-only model's).
      output_vocab_size: V of the decoder's targets and logits; None: same as `vocab_size`.
      emb_dim: D.
      num_heads: N (must divide `qkv_dim`).
      num_layers: L of the encoder and of the decoder.
      num_decoder_layers: L of the decoder when it differs; None: `num_layers`.
      qkv_dim: N*H of the attention projections; None: `emb_dim`.
      mlp_dim: M.
      max_len: the longest sequence positions are defined for (and the longest cache).
      dropout_rate: dropout on the embeddings and on each sublayer's output, in [0, 1).
      attention_dropout_rate: dropout on the attention weights, in [0, 1).
      position: "sinusoidal" (fixed table), "learned" (a `[max_len, D]` table) or "none".
      pre_norm: LayerNorm before each sublayer plus a final one (True), or after each residual add (the paper).
      tie_embeddings: the decoder's logits use its token embedding transposed (scaled by 1/sqrt(D)).
      share_embeddings: encoder and decoder share one token embedding (needs equal vocabularies).
      activation: the MLP's nonlinearity, "relu" (the paper), "gelu" or "silu".
      dtype: compute dtype; LayerNorm statistics, softmax and logits stay float32.
      param_dtype: storage dtype of the parameters (LayerNorm's scale and bias stay float32).
      scan_layers: run each stack with `nn.scan` over stacked parameters (compile time independent of depth).
      remat_policy: "none" or a key of `REMAT_POLICIES`.
      attention_implementation: see `seqjax.nn.scaled_dot_product_attention`.
      decode: cached autoregressive decoding (see the module docstring).
    """

    vocab_size: int
    output_vocab_size: int | None = None
    emb_dim: int = 512
    num_heads: int = 8
    num_layers: int = 6
    num_decoder_layers: int | None = None
    qkv_dim: int | None = None
    mlp_dim: int = 2048
    max_len: int = 256
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    position: str = "sinusoidal"
    pre_norm: bool = True
    tie_embeddings: bool = True
    share_embeddings: bool = False
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str = "auto"
    decode: bool = False

    def __post_init__(self):
        check_positive_ints(
            self,
            ("vocab_size", "emb_dim", "num_heads", "num_layers", "mlp_dim", "max_len"),
            optional=("output_vocab_size", "num_decoder_layers", "qkv_dim"),
        )
        if self.attention_dim % self.num_heads:
            raise ValueError(
                f"TransformerConfig.num_heads={self.num_heads} must divide the attention width "
                f"(qkv_dim or emb_dim) = {self.attention_dim}"
            )
        check_rates(self, ("dropout_rate", "attention_dropout_rate"))
        if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"TransformerConfig.remat_policy={self.remat_policy!r} is unknown; use 'none' or one of "
                f"{sorted(REMAT_POLICIES)}"
            )
        if self.position not in POSITIONS:
            raise ValueError(f"TransformerConfig.position={self.position!r} is unknown; use one of {POSITIONS}")
        if self.position == "sinusoidal" and self.emb_dim % 2:
            raise ValueError(f"TransformerConfig.emb_dim={self.emb_dim} must be even for sinusoidal positions")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TransformerConfig.activation={self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}"
            )
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"TransformerConfig.attention_implementation={self.attention_implementation!r} is unknown; use one "
                f"of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.share_embeddings and self.target_vocab_size != self.vocab_size:
            raise ValueError(
                f"TransformerConfig.share_embeddings needs output_vocab_size ({self.output_vocab_size}) equal to "
                f"vocab_size ({self.vocab_size})"
            )

    @property
    def attention_dim(self) -> int:
        return self.qkv_dim or self.emb_dim

    @property
    def target_vocab_size(self) -> int:
        return self.output_vocab_size or self.vocab_size

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers


# The fields a model that reuses the Transformer's blocks (ViT, the image decoder) passes on to them.
STACK_FIELDS = (
    "emb_dim", "num_heads", "num_layers", "mlp_dim", "dropout_rate", "attention_dropout_rate", "dtype",
    "param_dtype", "scan_layers", "remat_policy", "attention_implementation",
)  # fmt: skip


def stack_config(owner: Any, **extra) -> TransformerConfig:
    """The `TransformerConfig` for the block stack of another model's config `owner`: its `STACK_FIELDS` plus
    `extra`; token fields unused. Validation errors name the owner's class and field."""
    fields = {name: getattr(owner, name) for name in STACK_FIELDS}
    try:
        return TransformerConfig(**{"vocab_size": 1, "max_len": 1, "position": "none", **fields, **extra})
    except ValueError as e:
        raise ValueError(str(e).replace("TransformerConfig.", f"{type(owner).__name__}.")) from None


def check_tokens(config: TransformerConfig, tokens: Array, name: str) -> Array:
    """Integer `[B, T]` with T <= max_len, or a ValueError naming the argument and the field."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids [B, T], got shape {tokens.shape} dtype {tokens.dtype}")
    if tokens.shape[1] > config.max_len:
        raise ValueError(
            f"{name} has length {tokens.shape[1]} > TransformerConfig.max_len={config.max_len} (shape {tokens.shape})"
        )
    return tokens


# ------------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------------


def _layer_norm(config: TransformerConfig, name: str) -> Callable[[Array], Array]:
    """LayerNorm with float32 statistics whatever the compute dtype (output cast back to it)."""
    # flax's parameters and formula; the backward pass keeps the input and two statistics (seqjax.nn.norm).
    norm = LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name=name)  # float32 scale and bias too
    return lambda x: norm(x.astype(jnp.float32)).astype(config.dtype)


def _attention(config: TransformerConfig, name: str, decode: bool = False) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads=config.num_heads,
        qkv_features=config.attention_dim,
        dropout_rate=config.attention_dropout_rate,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        decode=decode,
        implementation=config.attention_implementation,
        name=name,
    )


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
    `(x [B, S, D], mask, deterministic, segment_ids [B, S] | None) -> [B, S, D]`."""

    @nn.compact
    def __call__(
        self, x: Array, mask: Array | None, deterministic: bool = True, segment_ids: Array | None = None
    ) -> Array:
        attn = _attention(self.config, "self_attention")
        kw = dict(mask=mask, deterministic=deterministic, segment_ids=segment_ids)
        x = self.residual(x, lambda y: attn(y, **kw), "ln_self", deterministic)
        return self.mlp(x, deterministic)


class DecoderBlock(_Sublayers):
    """Causal self-attention (`is_causal`, no [T, T] mask; cached when `config.decode`), cross-attention to
    `encoded` (skipped when it is None, as in a decoder-only model), then the MLP.

    `(x [B, T, D], encoded [B, S, D] | None, self_mask, cross_mask, deterministic, segment_ids [B, T] | None)
    -> [B, T, D]`; `self_mask` (usually None) and `segment_ids` (packed sequences) AND with causality.
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
    ) -> Array:
        cfg = self.config
        attn = _attention(cfg, "self_attention", decode=cfg.decode)
        kw = dict(mask=self_mask, deterministic=deterministic, is_causal=True, segment_ids=segment_ids)
        x = self.residual(x, lambda y: attn(y, **kw), "ln_self", deterministic)
        if encoded is not None:
            cross = _attention(cfg, "cross_attention")
            x = self.residual(
                x, lambda y: cross(y, encoded, mask=cross_mask, deterministic=deterministic), "ln_cross", deterministic
            )
        return self.mlp(x, deterministic)


class _Stack(nn.Module):
    """L blocks, unrolled (`layers_i`) or scanned (`layers`, stacked parameters), optionally rematerialised.

    `block_args` are broadcast to every layer; `deterministic` is static; `segment_ids` (packed sequences), when
    given, follows it.
    """

    config: TransformerConfig
    block: type[nn.Module]
    num_layers: int

    @nn.compact
    def __call__(self, x: Array, *block_args, deterministic: bool = True, segment_ids: Array | None = None) -> Array:
        cfg = self.config
        block = self.block
        static = 2 + len(block_args)  # position of `deterministic` counting self
        trailing = () if segment_ids is None else (segment_ids,)
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
    """Token embedding plus positions plus dropout: `tokens [B, T] -> [B, T, D]`.

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
        if cfg.position != "none":
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
        stack = _Stack(cfg, EncoderBlock, cfg.num_layers, name="stack")
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
        x = _Stack(cfg, DecoderBlock, cfg.decoder_layers, name="stack")(
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
        x = _Stack(cfg, DecoderBlock, cfg.num_layers, name="stack")(
            x, None, None, None, deterministic=deterministic, segment_ids=segment_ids
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
