"""Scaled dot-product attention and multi-head attention with a KV cache (the masks live in `seqjax.nn.masks` and
are re-exported here).

Glossary: B batch (any number of leading dims, written B...), Tq / Tk query / key length, N heads, K key/value
heads (grouped-query attention), H head dim, D model width, F input features, L cache length.

How attention is computed lives in `seqjax.kernels`, behind one registry: `scaled_dot_product_attention` and
`MultiHeadAttention` take a kernel by name (`implementation`, default "auto": chosen per platform when the program
is lowered) or any callable with `scaled_dot_product_attention`'s signature (`MultiHeadAttention(attention_fn=...)`,
flax's convention). `MultiHeadAttention` only projects, caches and calls it (DESIGN.md, style 7).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from seqjax import kernels
from seqjax.kernels.registry import BLOCKING
from seqjax.nn.masks import causal_mask, combine_masks, padding_mask, segment_mask
from seqjax.nn.position import apply_rotary

__all__ = [
    "IMPLEMENTATIONS",
    "MultiHeadAttention",
    "causal_mask",
    "combine_masks",
    "padding_mask",
    "scaled_dot_product_attention",
    "segment_mask",
]

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

IMPLEMENTATIONS = kernels.NAMES


# ----------------------------------------------------------------------------------------------------------------
# Scaled dot-product attention
# ----------------------------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    scale: float | None = None,
    precision: lax.PrecisionLike = None,
    implementation: str = "auto",
    block_elements: int | None = None,
    is_causal: bool = False,
    segment_ids: Array | tuple[Array, Array] | None = None,
) -> Array | tuple[Array, Array]:
    """Z = softmax(Q Kᵀ · scale + bias) V per head, with masking and dropout on the weights.

    Args:
      query: `[B..., Tq, N, H]`.
      key, value: `[B..., Tk, N, H]`.
      mask: bool, broadcastable to `[B..., N, Tq, Tk]` (same rank), True = may attend. A query whose row is fully
        masked gets a zero output (and zero gradient), never NaN.
      bias: float, broadcastable to `[B..., N, Tq, Tk]`, added to the scaled logits (e.g. relative positions).
      dropout_rate: dropout on the attention weights, applied when `deterministic` is False.
      dropout_rng: PRNG key for that dropout.
      deterministic: no dropout when True.
      return_weights: also return the softmax weights `[B..., N, Tq, Tk]` (float32, before dropout).
      scale: logit scale; default 1/sqrt(H).
      precision: matmul precision.
      implementation: a kernel of `seqjax.kernels.registry` by name: "auto" (default), "reference", "blocked",
        "jax", "cudnn", "cpu" (old name "xla" = "auto"). Every kernel computes the same function; one that cannot
        take a call (`bias`, `return_weights`, dropout) hands it on, ending at "reference".
      block_elements: target size of one block's scores for the blocked kernel (a speed knob; the result does not
        depend on it; ignored by kernels that do not block).
      is_causal: query i attends only to keys 0..i (top-left aligned when Tq != Tk, as in jax.nn and torch), without
        building a `[Tq, Tk]` mask: the blocked kernel computes it inside each block.
      segment_ids: packed sequences: int `[B..., T]` (Tq == Tk) or a pair (`[B..., Tq]`, `[B..., Tk]`); a query
        attends only to keys with its id, and id 0 is padding (its queries get zeros, its keys are never attended).
        Computed inside the blocks like `is_causal`. Both AND with `mask`.

    Returns:
      `[B..., Tq, N, H]` in the dtype of `value`, and the weights when `return_weights`. The logits and the softmax
      are computed in float32 whatever the input dtype.
    """
    kernel = kernels.attention_kernel(implementation)
    options = {} if block_elements is None or kernel.name not in BLOCKING else {"block_elements": block_elements}
    return kernel(
        query,
        key,
        value,
        mask,
        bias=bias,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        deterministic=deterministic,
        return_weights=return_weights,
        scale=scale,
        precision=precision,
        is_causal=is_causal,
        segment_ids=segment_ids,
        **options,
    )


# ----------------------------------------------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------------------------------------------


class _Weights(nn.Module):
    """Holds one projection's kernel and bias, so parameter names match flax's MultiHeadDotProductAttention
    ({"query": {"kernel", "bias"}, ...}) while the parent fuses the matmuls."""

    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    use_bias: bool
    kernel_init: Initializer
    bias_init: Initializer
    param_dtype: Dtype

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        kernel = self.param("kernel", self.kernel_init, self.kernel_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, self.bias_shape, self.param_dtype) if self.use_bias else None
        return kernel, bias


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project to N query heads and K key/value heads, attend, project back.

    Parameters have the names and shapes of flax's `nn.MultiHeadDotProductAttention` (query/key/value kernels
    `[F, N, H]`, biases `[N, H]`, out kernel `[N, H, D]`), so weights move between the two unchanged; with grouped
    heads the key/value kernels are `[F, K, H]` and their biases `[K, H]`.

    Attributes:
      num_heads: N.
      num_kv_heads: K, the key/value heads (grouped-query attention: query head n reads key/value head n // (N/K),
        Hugging Face's layout); 1 is multi-query attention; must divide N. None: N.
      qkv_features: N*H; defaults to the query input's width.
      out_features: D; defaults to the query input's width.
      dropout_rate: dropout on the attention weights.
      use_bias: biases on the four projections.
      dtype: compute dtype (default: inferred from inputs and params). Logits and softmax stay in float32.
      param_dtype: storage dtype of the parameters.
      precision: matmul precision.
      kernel_init, bias_init, out_kernel_init: initialisers (out_kernel_init defaults to kernel_init).
      rope_base: rotary position embeddings (`seqjax.nn.apply_rotary`, rotate-half convention as in Llama) with this
        frequency base, applied to the queries and keys of self-attention after their projection (so the cache holds
        rotated keys); None: no rotary embedding. H must be even.
      decode: incremental decoding of self-attention with a KV cache in the "cache" collection. `init` with inputs
        `[B, L, F]` creates a cache for L positions (`cached_key` / `cached_value` `[B, L, K, H]`); each later call
        with `[B, T, F]` (T >= 1, T = the whole prompt for a one-pass prefill) writes T positions and attends
        causally over everything cached so far; rotary positions continue from the cache index.
      attention_fn: the attention computation, a callable with `scaled_dot_product_attention`'s signature (flax's
        convention; called with `scale=1.0`, the scale being folded into the query kernel, and with key/value of K
        heads); None: the kernel named by `implementation`. A kernel with a `self_attention` method
        (`seqjax.kernels.AttentionKernel`) is given self-attention's fused projection as it is (when K = N).
      implementation: a kernel of `seqjax.kernels.registry` by name, as in `scaled_dot_product_attention`.
      fuse_qkv: compute the query/key/value projections as one matmul (same parameters, same function; faster).

    The attention weights `[B..., N, Tq, Tk]` are sown into "intermediates" as "attention_weights" when that
    collection is mutable (`apply(..., mutable=["intermediates"])`), for visualisation.
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: lax.PrecisionLike = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    out_kernel_init: Initializer | None = None
    decode: bool = False
    attention_fn: Callable[..., Any] | None = None
    implementation: str = "auto"
    fuse_qkv: bool = True
    num_kv_heads: int | None = None
    rope_base: float | None = None

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        deterministic: bool = True,
        *,
        is_causal: bool = False,
        segment_ids: Array | tuple[Array, Array] | None = None,
        positions: Array | None = None,
    ) -> Array:
        """Args:
          inputs_q: `[B..., Tq, F]`.
          inputs_kv: `[B..., Tk, F']` for cross-attention; None for self-attention.
          mask: bool broadcastable to `[B..., N, Tq, Tk]`, True = may attend.
          deterministic: disables dropout.
          is_causal, segment_ids: as in `scaled_dot_product_attention` (no `[Tq, Tk]` mask is built); passed to
            `attention_fn` only when set. With `decode`, the cache's own mask is causal and segment ids are refused.
          positions: rotary positions of the tokens, integer `[Tq]` or `[B..., Tq]` (with `rope_base` only);
            default 0..Tq-1, or, when decoding, the cache index + 0..Tq-1.

        Returns:
          `[B..., Tq, D]`.
        """
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        if inputs_q.ndim < 2 or inputs_kv.ndim != inputs_q.ndim or inputs_kv.shape[:-2] != inputs_q.shape[:-2]:
            raise ValueError(
                f"MultiHeadAttention expects inputs_q [B..., Tq, F] and inputs_kv [B..., Tk, F'] with the same "
                f"batch dims; got {inputs_q.shape} and {inputs_kv.shape}"
            )
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(
                f"qkv_features ({qkv_features}) must be divisible by num_heads ({self.num_heads}); inputs_q has "
                f"shape {inputs_q.shape}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.decode and not self_attention:
            raise ValueError("decode=True caches self-attention only; call it without inputs_kv")
        if self.decode and segment_ids is not None:
            raise ValueError("decode=True does not take segment_ids (the cache holds one sequence per row)")
        out_features = self.out_features or inputs_q.shape[-1]
        n, h = self.num_heads, qkv_features // self.num_heads
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if kv < 1 or self.num_heads % kv:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        rotate = self._rotary(positions, inputs_q.shape[-2], h, self_attention)

        def weights(name, fan_in, heads):
            shapes = (fan_in, heads, h), (heads, h)
            return _Weights(*shapes, self.use_bias, self.kernel_init, self.bias_init, self.param_dtype, name=name)()

        wq = weights("query", inputs_q.shape[-1], n)
        wk = weights("key", inputs_kv.shape[-1], kv)
        wv = weights("value", inputs_kv.shape[-1], kv)
        wo = _Weights(
            (n, h, out_features),
            (out_features,),
            self.use_bias,
            self.out_kernel_init or self.kernel_init,
            self.bias_init,
            self.param_dtype,
            name="out",
        )()

        # The 1/sqrt(H) logit scale is folded into the query kernel: [F, N*H] work instead of [B, T, N*H].
        scale = 1.0 / math.sqrt(h)
        wq = (
            wq[0] * jnp.asarray(scale, wq[0].dtype),
            None if wq[1] is None else wq[1] * jnp.asarray(scale, wq[1].dtype),
        )
        dtype = self.dtype or jnp.result_type(inputs_q, inputs_kv, wq[0])
        inputs_q, inputs_kv = inputs_q.astype(dtype), inputs_kv.astype(dtype)
        rate = self.dropout_rate if not deterministic else 0.0
        dropout_rng = self.make_rng("dropout") if rate > 0.0 else None
        want_weights = self.is_mutable_collection("intermediates")
        attention_fn = self.attention_fn or kernels.attention_kernel(self.implementation)
        qkv_fn = getattr(attention_fn, "self_attention", None)
        structure = {} if not is_causal and segment_ids is None else dict(is_causal=is_causal, segment_ids=segment_ids)
        if self_attention and self.fuse_qkv:
            qkv = _project(inputs_q, [wq, wk, wv], dtype, self.precision)  # [B..., T, N+2K, H]
            qkv = jnp.concatenate([rotate(qkv[..., : n + kv, :]), qkv[..., n + kv :, :]], axis=-2) if rotate else qkv
            if kv == n and qkv_fn is not None and not (self.decode or want_weights):
                # The kernel takes the projection as it is (one copy fewer than slicing q, k, v out of it).
                qkv = qkv.reshape(*qkv.shape[:-2], 3, n, h)  # [B..., T, 3, N, H]
                kw = dict(dropout_rate=rate, dropout_rng=dropout_rng, precision=self.precision, **structure)
                out = qkv_fn(qkv, mask, **kw)
                return self._out(out, wo, dtype)
            query, key, value = jnp.split(qkv, [n, n + kv], axis=-2)
        elif self.fuse_qkv:  # cross-attention
            query = _project(inputs_q, [wq], dtype, self.precision)
            key, value = jnp.split(_project(inputs_kv, [wk, wv], dtype, self.precision), [kv], axis=-2)
        else:
            pairs = ((inputs_q, wq), (inputs_kv, wk), (inputs_kv, wv))
            query, key, value = (_project(x, [w], dtype, self.precision) for x, w in pairs)
            query, key = (rotate(query), rotate(key)) if rotate else (query, key)

        if self.decode:
            key, value, mask = self._update_cache(key, value, mask)
            structure = {}  # the cache's mask is causal over the positions cached so far

        result = attention_fn(
            query,
            key,
            value,
            mask,
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            deterministic=rate == 0.0,
            return_weights=want_weights,
            scale=1.0,
            precision=self.precision,
            **structure,
        )
        if want_weights:
            result, attn = result
            self.sow("intermediates", "attention_weights", attn)
        return self._out(result, wo, dtype)

    def _out(self, result: Array, wo: tuple[Array, Array | None], dtype: Dtype) -> Array:
        """[B..., T, N, H] → [B..., T, D]."""
        kernel, bias = wo
        out = jnp.einsum("...tnh,nhd->...td", result, kernel.astype(dtype), precision=self.precision)
        if bias is not None:
            out = out + bias.astype(dtype)
        return out

    def _rotary(self, positions: Array | None, length: int, head_dim: int, self_attention: bool):
        """The rotary embedding, x [B..., T, heads, H] → x rotated at `positions` (default 0..T-1, after the cache
        index when decoding); None without `rope_base`."""
        if self.rope_base is None:
            if positions is not None:
                raise ValueError("positions are rotary positions: they need rope_base (None turns rotary off)")
            return None
        if not (self.rope_base > 0 and head_dim % 2 == 0 and self_attention):
            raise ValueError(
                f"rotary embeddings need rope_base > 0 (got {self.rope_base}), an even head dim (qkv_features / "
                f"num_heads = {head_dim}) and self-attention (no inputs_kv; got {self_attention=})"
            )
        if positions is None:
            positions = jnp.arange(length)  # [T]
            if self.decode and self.has_variable("cache", "cache_index"):
                positions = positions + self.get_variable("cache", "cache_index")
        return functools.partial(apply_rotary, positions=positions, base=self.rope_base)

    def _update_cache(self, key: Array, value: Array, mask: Array | None):
        """Writes this call's keys/values into the cache; returns the whole cache and the causal mask over it."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not initialized:  # init: the cache is created with the init input's length; the pass itself is causal
            return key, value, combine_masks(mask, causal_mask(key.shape[-3]))
        *batch, max_len, n, h = cached_key.value.shape
        t = key.shape[-3]
        if tuple(batch) != key.shape[:-3] or (n, h) != key.shape[-2:] or t > max_len:
            raise ValueError(
                f"decode: new keys {key.shape} do not fit the cache {cached_key.value.shape} (batch, heads and "
                f"head dim must match and at most {max_len} positions fit)"
            )
        index = cache_index.value
        start = (0,) * len(batch) + (index, 0, 0)
        cached_key.value = lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = lax.dynamic_update_slice(cached_value.value, value, start)
        cache_index.value = index + t
        # New query i sits at position index + i and sees cached positions <= index + i.
        q_pos = index + jnp.arange(t)
        decode_mask = (jnp.arange(max_len)[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, L]
        decode_mask = decode_mask.reshape((1,) * len(batch) + decode_mask.shape[1:])
        return cached_key.value, cached_value.value, combine_masks(mask, decode_mask)


def _project(x: Array, weights: Sequence[tuple[Array, Array | None]], dtype: Dtype, precision) -> Array:
    """x [B..., T, F] times kernels [F, N_i, H] as one [B*T, F] x [F, ΣN_i*H] matmul → [B..., T, ΣN_i, H] (for
    three kernels of N heads, a free reshape makes it [B..., T, 3, N, H])."""
    f, _, h = weights[0][0].shape
    kernel = jnp.concatenate([w for w, _ in weights], axis=1).astype(dtype)  # [F, ΣN_i, H]
    y = jnp.dot(x.reshape(-1, f), kernel.reshape(f, -1), precision=precision)  # [B*T, ΣN_i*H]
    if weights[0][1] is not None:
        y = y + jnp.concatenate([b for _, b in weights]).astype(dtype).reshape(-1)
    return y.reshape(*x.shape[:-1], kernel.shape[1], h)  # [B..., T, ΣN_i, H]
