"""`is_causal` and `segment_ids` (issue 22, item 3): every kernel equals the reference with the equivalent explicit
mask (values and gradients; Tq != Tk; fully masked rows; several blocks), and the blocked kernel builds no [Tq, Tk]
array for them (its compiled memory grows linearly with T)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import kernels
from seqjax.kernels import common
from seqjax.nn import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    padding_mask,
    scaled_dot_product_attention,
    segment_mask,
)

NAMES = [n for n in kernels.NAMES if n != "cudnn" or jax.default_backend() == "gpu"]


@pytest.fixture(autouse=True)
def _one_device(monkeypatch):
    """Kernels chosen as in a one-device process (the C++ one where built), as in test_registry.py."""
    monkeypatch.setattr(common, "single_device", lambda: True)


def _ids(seed, b, t, zeros_from=None):
    """Sorted segment ids in 0..3 per row [B, T] (runs, like packed rows); row 0 ends in padding (0) from
    `zeros_from`, so its last queries are fully masked."""
    ids = np.sort(np.random.default_rng(seed).integers(1, 4, (b, t)), axis=-1)
    if zeros_from is not None:
        ids[0, zeros_from:] = 0
    return jnp.asarray(ids, jnp.int32)


def _explicit(tq, tk, causal, segs, mask):
    """The equivalent explicit mask [B, 1|N, Tq, Tk] (None when there is none)."""
    causal_part = (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None])[None, None] if causal else None
    seg_part = None if segs is None else segment_mask(*segs)
    return combine_masks(mask, causal_part, seg_part)


# (Tq, Tk, block_elements): self-attention above one block for every kernel (the C++ one included: 2*2*384*384 >
# 2**19), and cross-attention both ways cut into many blocks.
SHAPES = [(384, 384, None), (200, 384, 4096), (384, 120, 4096)]


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("what", ["causal", "segments", "causal+segments+mask"])
@pytest.mark.parametrize("tq, tk, block_elements", SHAPES, ids=["self", "tq<tk", "tq>tk"])
@pytest.mark.parametrize("name", NAMES)
def test_every_kernel_equals_the_reference_with_the_explicit_mask(name, tq, tk, block_elements, what):
    b, n, h = 2, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, tq, n, h))
    k, v = (jax.random.normal(kk, (b, tk, n, h)) for kk in ks[1:])
    causal = "causal" in what
    segs = None
    if "segments" in what:
        q_ids = _ids(1, b, tq, zeros_from=tq - 17)  # 17 padding queries: fully masked, zero outputs
        segs = q_ids if tq == tk else (q_ids, _ids(2, b, tk))
    k_valid = jnp.arange(tk)[None] < jnp.array([[tk], [tk - 5]])
    mask = padding_mask(jnp.ones((b, tq), bool), k_valid) if "mask" in what else None
    pair = None if segs is None else (segs if isinstance(segs, tuple) else (segs, segs))
    explicit = _explicit(tq, tk, causal, pair, mask)
    opts = {} if block_elements is None else {"block_elements": block_elements}

    def run(fn):
        f = lambda q, k, v: jnp.sum(
            jnp.sin(fn(q, k, v)) * (1.0 + jnp.arange(tq, dtype=jnp.float32)[None, :, None, None] / tq)
        )
        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v), jax.jit(fn)(q, k, v)

    (got, got_grads), got_out = run(
        lambda q, k, v: scaled_dot_product_attention(
            q, k, v, mask, is_causal=causal, segment_ids=segs, implementation=name, **opts
        )
    )
    (want, want_grads), want_out = run(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, explicit, implementation="reference")
    )
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for u, w in zip(got_grads, want_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(u)))
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)
    if segs is not None:  # padding queries (segment 0) get zeros
        np.testing.assert_array_equal(np.asarray(got_out)[0, tq - 17 :], 0.0)


def test_causal_is_top_left_aligned():
    """Query i attends to keys 0..i whatever Tq and Tk (jax.nn's and torch's convention)."""
    q, k, v = jnp.ones((1, 3, 1, 2)), jnp.ones((1, 5, 1, 2)), jnp.arange(5.0)[None, :, None, None] * jnp.ones(2)
    out = scaled_dot_product_attention(q, k, v, is_causal=True, implementation="reference")
    np.testing.assert_allclose(np.asarray(out)[0, :, 0, 0], [0.0, 0.5, 1.0])  # means of v[0..i]
    np.testing.assert_array_equal(np.asarray(causal_mask(4)), np.asarray(common.causal_mask(4, 4)))


def test_segment_ids_errors_name_the_shapes():
    q, k = jnp.ones((2, 4, 1, 8)), jnp.ones((2, 6, 1, 8))
    with pytest.raises(ValueError, match="Tq == Tk"):
        scaled_dot_product_attention(q, k, k, segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"kv segment ids must be integers \[B..., 6\]"):
        scaled_dot_product_attention(q, k, k, segment_ids=(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)))
    with pytest.raises(ValueError, match="integers"):
        scaled_dot_product_attention(q, q, q, segment_ids=jnp.ones((2, 4)))


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["auto", "blocked", "cpu", "reference"])
def test_mha_is_causal_and_segment_ids_equal_the_explicit_mask(implementation):
    """Through MultiHeadAttention's fused projection (each kernel's self_attention) above one block."""
    x = jax.random.normal(jax.random.key(1), (2, 384, 16))
    ids = _ids(3, 2, 384, zeros_from=370)
    m = MultiHeadAttention(num_heads=2, implementation=implementation)
    params = m.init(jax.random.key(2), x)
    explicit = combine_masks(causal_mask(384), segment_mask(ids))
    loss = lambda **kw: jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x, **kw))), (0, 1)))
    (a, ga), (b, gb) = loss(is_causal=True, segment_ids=ids)(params, x), loss(mask=explicit)(params, x)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)


def _temp_bytes(t, kw):
    """Compiled temporary memory of forward + backward of the blocked kernel on [1, T, 1, 16] (not run)."""
    x = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
    f = lambda q, k, v: jnp.sum(scaled_dot_product_attention(q, k, v, implementation="blocked", **kw(t)))
    compiled = jax.jit(jax.value_and_grad(f, (0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blocked_is_causal_memory_is_linear_in_length():
    """4x the length costs about 4x the memory with is_causal / segment_ids (16x with a [T, T] mask, which the
    second check shows the measure sees)."""
    for kw in (lambda t: {"is_causal": True}, lambda t: {"segment_ids": jnp.ones((1, t), jnp.int32)}):
        small, large = _temp_bytes(2048, kw), _temp_bytes(8192, kw)
        assert large / small < 5.0, (small, large)
    with_mask = lambda t: {"mask": causal_mask(t)}
    assert _temp_bytes(8192, with_mask) / _temp_bytes(2048, with_mask) > 10.0
