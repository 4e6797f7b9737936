"""Position encodings: sinusoidal (1D and 2D), learned, and rotary (RoPE).

Glossary: B batch (any number of leading dims, written B...), T sequence length, D model width (channels),
N heads, H head dim, P positions (any shape of integer positions).

Additive encodings (`sinusoidal_positions`, `LearnedPositionEmbedding`, `AddSinusoidalPositions`) are added to the
token embeddings once; rotary encodings (`apply_rotary`) rotate the queries and keys inside every attention layer.
Each takes optional explicit `positions`, so a decoder with a KV cache can encode position `index` for a
one-token step instead of position 0.

The sin/cos angles are computed in float32 (float64 for float64 outputs) whatever the output dtype: in bfloat16 the
angle `pos * freq` loses all precision past a few hundred positions. These layers do no matmuls, so unlike the
other layers they have no `precision` attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def _angle_dtype(dtype: Dtype) -> Dtype:
    """float64 for float64 outputs, float32 for everything else (half precision included)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


# ----------------------------------------------------------------------------------------------------------------
# Sinusoidal
# ----------------------------------------------------------------------------------------------------------------


def sinusoidal_embedding(
    positions: Array, dim: int, *, max_timescale: float = 10000.0, dtype: Dtype = jnp.float32
) -> Array:
    """Sinusoidal encoding of arbitrary (integer or real) positions, interleaved sin/cos.

    Channel 2i is sin(pos / max_timescale**(2i/dim)) and channel 2i+1 is cos of the same angle.

    Args:
      positions: `[P...]`, integer or real.
      dim: number of channels D; must be even.
      max_timescale: the longest wavelength is 2π·max_timescale.
      dtype: output dtype.

    Returns:
      `[P..., D]`.
    """
    if not isinstance(dim, (int, np.integer)) or dim < 2 or dim % 2:
        raise ValueError(f"sinusoidal encoding needs an even dim >= 2 (sin and cos channels in pairs), got dim={dim}")
    acc = _angle_dtype(dtype)
    inv_timescale = jnp.asarray(max_timescale, acc) ** (-jnp.arange(0, dim, 2, dtype=acc) / dim)  # [D/2]
    angles = jnp.asarray(positions).astype(acc)[..., None] * inv_timescale  # [P..., D/2]
    # Stacking on a new last axis then flattening it interleaves: [sin_0, cos_0, sin_1, cos_1, ...].
    out = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [P..., D/2, 2]
    return out.reshape(*angles.shape[:-1], dim).astype(dtype)


def sinusoidal_positions(length: int, dim: int, *, max_timescale: float = 10000.0, dtype: Dtype = jnp.float32) -> Array:
    """The Transformer's fixed position table for positions 0..length-1.

    Channel 2i is sin(pos / max_timescale**(2i/dim)) and channel 2i+1 is cos of the same angle (interleaved, not
    the "all sines then all cosines" layout of some codebases).

    Args:
      length: number of positions T (>= 0).
      dim: number of channels D; must be even.
      max_timescale: the longest wavelength is 2π·max_timescale.
      dtype: output dtype.

    Returns:
      `[T, D]`.
    """
    if not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"sinusoidal_positions: length must be an int >= 0, got length={length}")
    return sinusoidal_embedding(jnp.arange(length), dim, max_timescale=max_timescale, dtype=dtype)


def sinusoidal_positions_2d(
    height: int, width: int, dim: int, *, max_timescale: float = 10000.0, dtype: Dtype = jnp.float32
) -> Array:
    """Fixed position table for a grid of image patches.

    Layout: the first D/2 channels encode the row, the last D/2 the column, each half being the interleaved 1D
    table of `sinusoidal_positions` with D/2 channels:

        out[y, x, :D/2] = sinusoidal_positions(height, D/2)[y]
        out[y, x, D/2:] = sinusoidal_positions(width, D/2)[x]

    Flatten with `reshape(height * width, dim)` for row-major patch sequences.

    Args:
      height, width: grid size.
      dim: number of channels D; must be divisible by 4 (an even number of channels for each axis).
      max_timescale: as for `sinusoidal_positions`.
      dtype: output dtype.

    Returns:
      `[height, width, D]`.
    """
    if not isinstance(dim, (int, np.integer)) or dim < 4 or dim % 4:
        raise ValueError(
            f"sinusoidal_positions_2d needs dim divisible by 4 (half for rows, half for columns, each in sin/cos "
            f"pairs), got dim={dim}"
        )
    half = dim // 2
    rows = sinusoidal_positions(height, half, max_timescale=max_timescale, dtype=dtype)  # [height, D/2]
    cols = sinusoidal_positions(width, half, max_timescale=max_timescale, dtype=dtype)  # [width, D/2]
    rows = jnp.broadcast_to(rows[:, None, :], (height, width, half))
    cols = jnp.broadcast_to(cols[None, :, :], (height, width, half))
    return jnp.concatenate([rows, cols], axis=-1)  # [height, width, D]


def _positions_fit(positions: Array, lead: tuple[int, ...]) -> bool:
    """Whether integer positions `[T]` or `[B..., T]` broadcast to `lead = (*B, T)` with the same T."""
    if not (1 <= positions.ndim <= len(lead) and positions.shape[-1] == lead[-1]):
        return False
    try:
        return np.broadcast_shapes(positions.shape, lead) == lead
    except ValueError:
        return False


def _check_inputs(layer: str, inputs: Array, positions: Array | None) -> None:
    """inputs must be [B..., T, D]; positions, when given, must broadcast to [B..., T]."""
    if inputs.ndim < 2:
        raise ValueError(f"{layer} expects inputs [B..., T, D] (rank >= 2), got shape {inputs.shape}")
    if positions is None:
        return
    if not _positions_fit(positions, inputs.shape[:-1]):
        raise ValueError(
            f"{layer}: positions of shape {positions.shape} do not broadcast to [B..., T] = {inputs.shape[:-1]} "
            f"(inputs {inputs.shape})"
        )
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"{layer}: positions must be integers, got dtype {positions.dtype}")


class AddSinusoidalPositions(nn.Module):
    """Adds the fixed sinusoidal table (`sinusoidal_positions`) to the inputs; no parameters.

    Attributes:
      max_timescale: as for `sinusoidal_positions`.
      dtype: compute and output dtype; defaults to the inputs' dtype (the table is cast to it, so bfloat16
        activations stay bfloat16).
    """

    max_timescale: float = 10000.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array, positions: Array | None = None) -> Array:
        """Args:
          inputs: `[B..., T, D]`, D even.
          positions: optional integer `[B..., T]` (or anything broadcasting to it, e.g. `[T]`); default 0..T-1.

        Returns:
          `[B..., T, D]`: inputs + encoding.
        """
        inputs = jnp.asarray(inputs)
        positions = None if positions is None else jnp.asarray(positions)
        _check_inputs("AddSinusoidalPositions", inputs, positions)
        dtype = self.dtype or inputs.dtype
        t, d = inputs.shape[-2:]
        if positions is None:
            table = sinusoidal_positions(t, d, max_timescale=self.max_timescale, dtype=dtype)  # [T, D]
        else:
            table = sinusoidal_embedding(positions, d, max_timescale=self.max_timescale, dtype=dtype)  # [B..., T, D]
        return inputs.astype(dtype) + table


# ----------------------------------------------------------------------------------------------------------------
# Learned
# ----------------------------------------------------------------------------------------------------------------


class LearnedPositionEmbedding(nn.Module):
    """Adds a learned table of `max_len` position vectors to the inputs.

    The parameter "embedding" has shape `[max_len, D]`, D taken from the inputs at `init`.

    Attributes:
      max_len: number of positions the table holds.
      embedding_init: initialiser of the table (BERT / GPT-2 use normal(0.02)).
      param_dtype: storage dtype of the table.
      dtype: compute and output dtype; defaults to the inputs' dtype (the table is cast to it, so bfloat16
        activations stay bfloat16 with a float32 table).
    """

    max_len: int
    embedding_init: Initializer = nn.initializers.normal(stddev=0.02)
    param_dtype: Dtype = jnp.float32
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array, positions: Array | None = None) -> Array:
        """Args:
          inputs: `[B..., T, D]`.
          positions: optional integer `[B..., T]` (or anything broadcasting to it, e.g. `[T]`), each in
            [0, max_len); default 0..T-1 (then T <= max_len is required). Positions outside the table are traced
            values that cannot be checked here, so they give NaN rather than a silently clamped row.

        Returns:
          `[B..., T, D]`: inputs + embedding[positions].
        """
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got max_len={self.max_len}")
        inputs = jnp.asarray(inputs)
        positions = None if positions is None else jnp.asarray(positions)
        _check_inputs("LearnedPositionEmbedding", inputs, positions)
        t, d = inputs.shape[-2:]
        if positions is None and t > self.max_len:
            raise ValueError(
                f"LearnedPositionEmbedding: inputs {inputs.shape} have T={t} positions but the table holds "
                f"max_len={self.max_len} ([max_len, D] = {(self.max_len, d)})"
            )
        embedding = self.param("embedding", self.embedding_init, (self.max_len, d), self.param_dtype)
        dtype = self.dtype or inputs.dtype
        embedding = embedding.astype(dtype)
        if positions is None:
            pos_emb = embedding[:t]  # [T, D]
        else:
            # Negative positions would wrap around (numpy semantics); send them out of range too, so they give NaN.
            safe = jnp.where(positions < 0, self.max_len, positions)
            pos_emb = jnp.take(embedding, safe, axis=0, mode="fill", fill_value=jnp.nan)  # [B..., T, D]
        return inputs.astype(dtype) + pos_emb


# ----------------------------------------------------------------------------------------------------------------
# Rotary (RoPE)
# ----------------------------------------------------------------------------------------------------------------


def rotary_frequencies(head_dim: int, *, base: float = 10000.0, dtype: Dtype = jnp.float32) -> Array:
    """Angular frequency of each rotated channel pair: pair i turns by base**(-2i/H) radians per position.

    Args:
      head_dim: H; must be even.
      base: as in RoPE (10000 in the paper and in LLaMA 1/2).
      dtype: output dtype.

    Returns:
      `[H/2]`.
    """
    if not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary encoding needs an even head dim >= 2 (channels rotate in pairs), got {head_dim}")
    return jnp.asarray(base, dtype) ** (-jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim)


def apply_rotary(x: Array, positions: Array, *, base: float = 10000.0) -> Array:
    """Rotary position embedding, "rotate-half" convention (GPT-NeoX, LLaMA, Hugging Face).

    Channel j < H/2 is paired with channel j + H/2 and the pair is rotated by the angle pos·base**(-2j/H):

        out = x·cos + rotate_half(x)·sin,   rotate_half(x) = concat(-x[..., H/2:], x[..., :H/2])

    Applied to queries and keys, it makes ⟨rot(q, m), rot(k, n)⟩ depend on the positions only through m - n.
    (The interleaved convention of the RoFormer paper and GPT-J pairs channels 2i and 2i+1 instead; weights trained
    with one need their head dim permuted for the other.)

    Args:
      x: `[B..., T, N, H]`, H even (queries or keys).
      positions: integer `[T]` (shared by the batch) or `[B..., T]` (e.g. per-sequence offsets when decoding).
      base: frequency base.

    Returns:
      `[B..., T, N, H]` in x's dtype. Angles, sin and cos and the rotation are computed in float32 (float64 for
      float64 x).
    """
    x, positions = jnp.asarray(x), jnp.asarray(positions)
    if x.ndim < 3:
        raise ValueError(f"apply_rotary expects x [B..., T, N, H] (rank >= 3), got shape {x.shape}")
    lead = x.shape[:-2]  # [B..., T]
    if not _positions_fit(positions, lead):
        raise ValueError(
            f"apply_rotary: positions must be [T] or [B..., T] = {lead} for x [B..., T, N, H] = {x.shape}; got "
            f"positions of shape {positions.shape}"
        )
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"apply_rotary: positions must be integers, got dtype {positions.dtype}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rotary needs an even head dim H (channels rotate in pairs); x has shape {x.shape}")

    acc = _angle_dtype(x.dtype)
    freqs = rotary_frequencies(head_dim, base=base, dtype=acc)  # [H/2]
    angles = positions.astype(acc)[..., None, None] * freqs  # [B..., T, 1, H/2]: one angle per head
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(acc)
    x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2 :]  # [B..., T, N, H/2] each
    # The two halves of x·cos + rotate_half(x)·sin, without materialising the duplicated cos/sin tables.
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B..., T, N, H]
    return out.astype(x.dtype)
