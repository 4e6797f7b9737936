"""The Transformer models' configuration: `StackConfig` (the block stack's fields, declared and validated once),
`TransformerConfig` extending it (frozen, validated), the names their fields choose from, `stack_config` for the
other models built on the Transformer's blocks (`ViTConfig`, `ImageDecoderConfig`, which extend `StackConfig` too),
and `check_tokens`.

Glossary: B batch, T length, D width (`emb_dim`), N query heads, K key/value heads, H head dim, M MLP width,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax import kernels
from seqjax.models.config_base import ConfigBase, check_positive_ints, check_rates

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
POSITIONS = ("sinusoidal", "learned", "rope", "none")
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}
FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64))
ATTENTION_IMPLEMENTATIONS = kernels.NAMES  # seqjax.kernels.registry; "auto" chooses per platform


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig(ConfigBase):
    """The fields of a stack of Transformer blocks, each declared (with its one default) and validated here only:
    `TransformerConfig`, `ViTConfig` and `ImageDecoderConfig` extend it. Keyword-only, so that a subclass's own
    required fields (`vocab_size`, `num_classes`, ...) come first and stay positional. Errors name the concrete
    class, e.g. `ViTConfig.emb_dim must be a positive int, got emb_dim=0`.

    Attributes:
      emb_dim: D.
      num_heads: N (must divide the attention width: `emb_dim`, or `TransformerConfig.qkv_dim`).
      num_layers: L (of the encoder and of the decoder, in `TransformerConfig`).
      mlp_dim: M.
      dropout_rate: dropout on the embeddings and on each sublayer's output, in [0, 1).
      attention_dropout_rate: dropout on the attention weights, in [0, 1).
      dtype: compute dtype (a dtype or its name, e.g. "bfloat16"; stored as a numpy dtype); LayerNorm statistics,
        softmax and logits stay float32.
      param_dtype: storage dtype of the parameters, as `dtype` (LayerNorm's scale and bias stay float32).
      scan_layers: run each stack with `nn.scan` over stacked parameters (compile time independent of depth).
      remat_policy: "none" or a key of `REMAT_POLICIES`.
      attention_implementation: see `seqjax.nn.scaled_dot_product_attention`.
    """

    emb_dim: int = 512
    num_heads: int = 8
    num_layers: int = 6
    mlp_dim: int = 2048
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str = "auto"

    def __post_init__(self):
        name = type(self).__name__
        for field in ("dtype", "param_dtype"):  # a name ("bfloat16", from a config file or the command line) or a type
            value = getattr(self, field)
            try:
                dtype = None if value is None else jnp.dtype(value)
            except TypeError:
                dtype = None
            if dtype is None or dtype not in FLOAT_DTYPES:  # (`in` alone: a numpy dtype equals None, as float64)
                names = ", ".join(repr(d.name) for d in FLOAT_DTYPES)
                raise ValueError(f"{name}.{field}={value!r} is not a floating dtype; use one of {names}")
            object.__setattr__(self, field, dtype)
        check_positive_ints(self, ("emb_dim", "num_heads", "num_layers", "mlp_dim"))
        check_rates(self, ("dropout_rate", "attention_dropout_rate"))
        if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"{name}.remat_policy={self.remat_policy!r} is unknown; use 'none' or one of {sorted(REMAT_POLICIES)}"
            )
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"{name}.attention_implementation={self.attention_implementation!r} is unknown; use one of "
                f"{ATTENTION_IMPLEMENTATIONS}"
            )


# The fields a model that reuses the Transformer's blocks (ViT, the image decoder) passes on to them.
STACK_FIELDS = tuple(f.name for f in dataclasses.fields(StackConfig))


@dataclasses.dataclass(frozen=True)
class TransformerConfig(StackConfig):
    """Every hyperparameter of the Transformer models; derive variants with `config.replace(...)`. `vocab_size` may
    be given by position, the rest by keyword.

    Attributes (and `StackConfig`'s: emb_dim, num_heads, num_layers, mlp_dim, dropout_rate, attention_dropout_rate,
    dtype, param_dtype, scan_layers, remat_policy, attention_implementation):
      vocab_size: V of the inputs (the encoder's, or the decoder-only model's).
      output_vocab_size: V of the decoder's targets and logits; None: same as `vocab_size`.
      num_kv_heads: K, the key/value heads of every attention (grouped-query attention; 1 is multi-query); must
        divide `num_heads`. None: `num_heads`.
      num_decoder_layers: L of the decoder when it differs; None: `num_layers`.
      qkv_dim: N*H of the attention projections; None: `emb_dim`.
      max_len: the longest sequence positions are defined for (and the longest cache).
      position: "sinusoidal" (fixed table), "learned" (a `[max_len, D]` table), both added to the embeddings;
        "rope" (rotary embeddings of the queries and keys in every self-attention, none added; head dim even); or
        "none".
      rope_base: the rotary frequency base (with `position="rope"`), > 0.
      pre_norm: LayerNorm before each sublayer plus a final one (True), or after each residual add (the paper).
      tie_embeddings: the decoder's logits use its token embedding transposed (scaled by 1/sqrt(D)).
      share_embeddings: encoder and decoder share one token embedding (needs equal vocabularies).
      activation: the MLP's nonlinearity, "relu" (the paper), "gelu" or "silu".
      decode: cached autoregressive decoding (see the module docstring).
    """

    vocab_size: int
    output_vocab_size: int | None = None
    num_kv_heads: int | None = None
    num_decoder_layers: int | None = None
    qkv_dim: int | None = None
    max_len: int = 256
    position: str = "sinusoidal"
    rope_base: float = 10000.0
    pre_norm: bool = True
    tie_embeddings: bool = True
    share_embeddings: bool = False
    activation: str = "gelu"
    decode: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(
            self,
            ("vocab_size", "max_len"),
            optional=("output_vocab_size", "num_decoder_layers", "qkv_dim", "num_kv_heads"),
        )
        if self.attention_dim % self.num_heads:
            raise ValueError(
                f"TransformerConfig.num_heads={self.num_heads} must divide the attention width "
                f"(qkv_dim or emb_dim) = {self.attention_dim}"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if not self.rope_base > 0:
            raise ValueError(f"TransformerConfig.rope_base must be > 0, got rope_base={self.rope_base!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"TransformerConfig.position={self.position!r} is unknown; use one of {POSITIONS}")
        if self.position == "sinusoidal" and self.emb_dim % 2:
            raise ValueError(f"TransformerConfig.emb_dim={self.emb_dim} must be even for sinusoidal positions")
        if self.position == "rope" and (self.attention_dim // self.num_heads) % 2:
            raise ValueError(
                f"TransformerConfig.position='rope' needs an even head dim; (qkv_dim or emb_dim) / num_heads = "
                f"{self.attention_dim} / {self.num_heads} = {self.attention_dim // self.num_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TransformerConfig.activation={self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}"
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


def stack_config(owner: StackConfig, **extra) -> TransformerConfig:
    """The `TransformerConfig` for the block stack of another model's config `owner` (a `StackConfig`): its
    `STACK_FIELDS` plus `extra`; token fields unused. Validation errors name the owner's class and field."""
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
