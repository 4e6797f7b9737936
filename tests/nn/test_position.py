"""Position encodings against element-by-element numpy references, plus the properties they exist for."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn import (
    AddSinusoidalPositions,
    LearnedPositionEmbedding,
    apply_rotary,
    rotary_frequencies,
    sinusoidal_embedding,
    sinusoidal_positions,
    sinusoidal_positions_2d,
)

# ------------------------------------------------------------------------------------------------------------
# Independent references: plain loops over positions and channels, float64.
# ------------------------------------------------------------------------------------------------------------


def normal(shape, dtype=np.float32, seed=0):
    """Test data from numpy: a jax.random draw compiles a sampler per shape, which dominates these tiny tests."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def ref_sinusoidal(positions, dim, max_timescale=10000.0):
    positions = np.asarray(positions)
    out = np.zeros((*positions.shape, dim))
    for idx in np.ndindex(positions.shape):
        pos = float(positions[idx])
        for i in range(dim // 2):
            angle = pos / max_timescale ** (2 * i / dim)
            out[(*idx, 2 * i)] = math.sin(angle)
            out[(*idx, 2 * i + 1)] = math.cos(angle)
    return out


def ref_rotary(x, positions, base=10000.0):
    """x [B, T, N, H], positions [B, T]: rotates each pair (j, j + H/2) by pos * base**(-2j/H)."""
    x = np.asarray(x, np.float64)
    b, t, n, h = x.shape
    out = np.zeros_like(x)
    for bi, ti, ni in np.ndindex(b, t, n):
        for j in range(h // 2):
            angle = float(positions[bi, ti]) * base ** (-2 * j / h)
            c, s = math.cos(angle), math.sin(angle)
            a, bb = x[bi, ti, ni, j], x[bi, ti, ni, j + h // 2]
            out[bi, ti, ni, j] = a * c - bb * s
            out[bi, ti, ni, j + h // 2] = bb * c + a * s
    return out


# ------------------------------------------------------------------------------------------------------------
# Sinusoidal
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,dim,max_timescale", [(7, 8, 10000.0), (5, 2, 100.0), (1, 6, 10000.0)])
def test_sinusoidal_positions_matches_reference(length, dim, max_timescale):
    got = sinusoidal_positions(length, dim, max_timescale=max_timescale)
    assert got.shape == (length, dim) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_sinusoidal(np.arange(length), dim, max_timescale), atol=1e-6)


def test_sinusoidal_even_channels_are_sin_odd_are_cos():
    table = np.asarray(sinusoidal_positions(4, 6))
    # Position 0: every angle is 0, so sin channels are 0 and cos channels are 1.
    np.testing.assert_array_equal(table[0, 0::2], 0.0)
    np.testing.assert_array_equal(table[0, 1::2], 1.0)
    # Channel pair 0 has frequency 1: sin(pos), cos(pos).
    np.testing.assert_allclose(table[:, 0], np.sin(np.arange(4)), atol=1e-6)
    np.testing.assert_allclose(table[:, 1], np.cos(np.arange(4)), atol=1e-6)


def test_sinusoidal_float64(x64):
    got = sinusoidal_positions(9, 10, dtype=jnp.float64)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, ref_sinusoidal(np.arange(9), 10), rtol=0, atol=1e-12)


def test_sinusoidal_embedding_at_arbitrary_positions():
    positions = np.array([[3, 0, 11], [5, 5, 2]])
    got = sinusoidal_embedding(jnp.asarray(positions), 4)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, ref_sinusoidal(positions, 4), atol=1e-6)


@pytest.mark.parametrize("dim", [0, 3, 7])
def test_sinusoidal_odd_dim_raises(dim):
    with pytest.raises(ValueError, match=f"dim={dim}"):
        sinusoidal_positions(4, dim)


def test_sinusoidal_negative_length_raises():
    with pytest.raises(ValueError, match="length=-1"):
        sinusoidal_positions(-1, 4)


def test_sinusoidal_bf16():
    got = sinusoidal_positions(16, 8, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ref_sinusoidal(np.arange(16), 8), atol=1e-2)


def test_sinusoidal_2d_layout():
    height, width, dim = 3, 4, 8
    got = np.asarray(sinusoidal_positions_2d(height, width, dim))
    assert got.shape == (height, width, dim)
    rows, cols = ref_sinusoidal(np.arange(height), dim // 2), ref_sinusoidal(np.arange(width), dim // 2)
    for y, x in np.ndindex(height, width):
        np.testing.assert_allclose(got[y, x, : dim // 2], rows[y], atol=1e-6)
        np.testing.assert_allclose(got[y, x, dim // 2 :], cols[x], atol=1e-6)


@pytest.mark.parametrize("dim", [6, 2, 10])
def test_sinusoidal_2d_dim_not_multiple_of_4_raises(dim):
    with pytest.raises(ValueError, match=f"dim={dim}"):
        sinusoidal_positions_2d(2, 2, dim)


def test_add_sinusoidal_positions(rng):
    x = normal((2, 5, 6))
    layer = AddSinusoidalPositions()
    variables = layer.init(rng, x)
    assert variables == {}
    out = layer.apply(variables, x)
    np.testing.assert_allclose(out, np.asarray(x) + ref_sinusoidal(np.arange(5), 6)[None], atol=1e-6)
    # Explicit positions (a decoding step at offset 7 in one row, 2 in the other).
    positions = jnp.array([[7], [2]])
    out = layer.apply(variables, x[:, :1], positions)
    np.testing.assert_allclose(out, np.asarray(x[:, :1]) + ref_sinusoidal(positions, 6), atol=1e-6)


def test_add_sinusoidal_positions_bf16_and_bad_shapes(rng):
    x = normal((2, 4, 8), jnp.bfloat16)
    layer = AddSinusoidalPositions()
    assert layer.apply({}, x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        layer.apply({}, x, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="dim=5"):
        layer.apply({}, jnp.zeros((2, 4, 5)))


# ------------------------------------------------------------------------------------------------------------
# Learned
# ------------------------------------------------------------------------------------------------------------


def test_learned_adds_table_slice(rng):
    x = normal((2, 3, 4, 8))  # two batch dims
    layer = LearnedPositionEmbedding(max_len=6)
    variables = layer.init(rng, x)
    table = variables["params"]["embedding"]
    assert table.shape == (6, 8) and table.dtype == jnp.float32
    assert 0.005 < float(jnp.std(table)) < 0.05  # normal(0.02) init
    out = layer.apply(variables, x)
    np.testing.assert_allclose(out, np.asarray(x) + np.asarray(table)[:4], atol=1e-7)


def test_learned_explicit_positions_equal_slice(rng):
    x = normal((2, 4, 8))
    layer = LearnedPositionEmbedding(max_len=6)
    variables = layer.init(rng, x)
    full = layer.apply(variables, x)
    np.testing.assert_array_equal(layer.apply(variables, x, jnp.broadcast_to(jnp.arange(4), (2, 4))), full)
    np.testing.assert_array_equal(layer.apply(variables, x, jnp.arange(4)), full)
    # One decoding step per row, at different offsets.
    positions = jnp.array([[5], [1]])
    step = layer.apply(variables, x[:, 2:3], positions)
    table = np.asarray(variables["params"]["embedding"])
    np.testing.assert_allclose(step, np.asarray(x[:, 2:3]) + table[[[5], [1]]], atol=1e-7)


def test_learned_out_of_range_positions_are_nan(rng):
    x = jnp.zeros((1, 3, 4))
    layer = LearnedPositionEmbedding(max_len=4)
    variables = layer.init(rng, x)
    out = np.asarray(layer.apply(variables, x, jnp.array([[0, 4, -1]])))
    assert np.isfinite(out[0, 0]).all() and np.isnan(out[0, 1:]).all()


def test_learned_too_long_raises(rng):
    layer = LearnedPositionEmbedding(max_len=3)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\).*max_len=3"):
        layer.init(rng, jnp.zeros((2, 4, 8)))


def test_learned_bad_positions_shape_raises(rng):
    layer = LearnedPositionEmbedding(max_len=8)
    x = jnp.zeros((2, 4, 8))
    variables = layer.init(rng, x)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        layer.apply(variables, x, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\(1,\)"):  # one position for four tokens is a bug, not a broadcast
        layer.apply(variables, x, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        layer.apply(variables, x, jnp.zeros((2, 4), jnp.float32))


def test_learned_bf16(rng):
    x = normal((2, 4, 8), jnp.bfloat16)
    positions = jnp.array([[3, 0, 7, 1], [2, 2, 5, 6]])
    table = normal((8, 8), seed=5)  # unit-scale rows, so a wrong or missing row shows at bfloat16 precision
    layer = LearnedPositionEmbedding(max_len=8)  # float32 table, bfloat16 activations
    assert layer.init(rng, x)["params"]["embedding"].dtype == jnp.float32
    out = layer.apply({"params": {"embedding": table}}, x, positions)
    assert out.dtype == jnp.bfloat16
    # Measured: 0.010 at most against float64 (sums up to 4 in bfloat16); 3x that.
    ref = np.asarray(x, np.float64) + np.asarray(table, np.float64)[np.asarray(positions)]
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=0.03, rtol=0)
    layer16 = LearnedPositionEmbedding(max_len=8, param_dtype=jnp.bfloat16, dtype=jnp.float32)
    assert layer16.init(rng, x)["params"]["embedding"].dtype == jnp.bfloat16
    table16 = table.astype(jnp.bfloat16)
    out = layer16.apply({"params": {"embedding": table16}}, x)
    assert out.dtype == jnp.float32
    # float32 compute of bfloat16 numbers: exact up to float32 rounding.
    ref = np.asarray(x, np.float64) + np.asarray(table16, np.float64)[:4]
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Rotary
# ------------------------------------------------------------------------------------------------------------


def test_rotary_frequencies():
    np.testing.assert_allclose(rotary_frequencies(8), [10000.0 ** (-2 * i / 8) for i in range(4)], rtol=1e-6)
    with pytest.raises(ValueError, match="5"):
        rotary_frequencies(5)


@pytest.mark.parametrize("shared_positions", [True, False])
def test_rotary_matches_reference(rng, shared_positions):
    x = normal((2, 5, 3, 8))
    if shared_positions:
        positions = jnp.arange(5) + 3
        full_positions = np.broadcast_to(np.asarray(positions), (2, 5))
    else:
        positions = jnp.array([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])
        full_positions = np.asarray(positions)
    got = apply_rotary(x, positions)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, ref_rotary(x, full_positions), atol=1e-5)


def test_rotary_float64_and_base(x64, rng):
    x = normal((1, 4, 2, 6), jnp.float64)
    positions = jnp.array([[0, 7, 100, 1000]])
    got = apply_rotary(x, positions, base=500.0)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, ref_rotary(x, np.asarray(positions), base=500.0), rtol=0, atol=1e-12)


def test_rotary_position_zero_is_identity(rng):
    x = normal((2, 3, 2, 4))
    np.testing.assert_array_equal(apply_rotary(x, jnp.zeros(3, jnp.int32)), x)


def test_rotary_preserves_norm(rng):
    x = normal((3, 6, 2, 16))
    out = apply_rotary(x, jnp.arange(6) * 37)
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    q = normal(seed=1, shape=(1, 1, 1, 16))
    k = normal(seed=2, shape=(1, 1, 1, 16))

    def score(m, n):
        rq = apply_rotary(q, jnp.array([m]))
        rk = apply_rotary(k, jnp.array([n]))
        return float(jnp.sum(rq * rk))

    for m, n in [(5, 2), (0, 4), (3, 3)]:
        base = score(m, n)
        for shift in (1, 13, 200):
            assert score(m + shift, n + shift) == pytest.approx(base, abs=1e-4)
    # ...and does change with the offset, otherwise the property above would be vacuous.
    assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_rotary_bf16(rng):
    x = normal((2, 4, 2, 8), jnp.bfloat16)
    positions = jnp.arange(4) + 50
    got = apply_rotary(x, positions)
    assert got.dtype == jnp.bfloat16
    ref = ref_rotary(x.astype(jnp.float32), np.broadcast_to(np.asarray(positions), (2, 4)))
    np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=3e-2)


def test_rotary_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(2, 4, 2, 7\)"):
        apply_rotary(jnp.zeros((2, 4, 2, 7)), jnp.arange(4))
    with pytest.raises(ValueError, match=r"positions of shape \(5,\)"):
        apply_rotary(jnp.zeros((2, 4, 2, 8)), jnp.arange(5))
    with pytest.raises(ValueError, match=r"positions of shape \(3, 4\)"):
        apply_rotary(jnp.zeros((2, 4, 2, 8)), jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"rank >= 3"):
        apply_rotary(jnp.zeros((4, 8)), jnp.arange(4))
    with pytest.raises(ValueError, match="integers"):
        apply_rotary(jnp.zeros((2, 4, 2, 8)), jnp.arange(4.0))


def test_layers_under_jit_with_traced_positions(rng):
    """Positions as traced values (a decoding step's offsets are): against the references, not the eager run."""
    x = normal((2, 3, 4))
    positions = jnp.array([[1, 2, 3], [4, 5, 6]])
    table = normal((8, 4), seed=3)
    got = jax.jit(LearnedPositionEmbedding(max_len=8).apply)({"params": {"embedding": table}}, x, positions)
    np.testing.assert_allclose(got, np.asarray(x) + np.asarray(table)[np.asarray(positions)], atol=1e-6)
    got = jax.jit(AddSinusoidalPositions().apply)({}, x, positions)
    np.testing.assert_allclose(got, np.asarray(x) + ref_sinusoidal(positions, 4), atol=1e-6)


def test_rotary_under_jit_with_traced_positions(rng):
    x = normal((2, 3, 2, 4))
    positions = jnp.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(jax.jit(apply_rotary)(x, positions), ref_rotary(x, np.asarray(positions)), atol=1e-5)
