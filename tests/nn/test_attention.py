"""Attention against independent references: a numpy softmax(QKᵀ/√d)V, flax's built-in layers, autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from seqjax.kernels import blocked as blocked_kernel
from seqjax.kernels import common
from seqjax.kernels.blocked import block_sizes as _block_sizes
from seqjax.kernels.cpu import attention as cpu_attention
from seqjax.nn import MultiHeadAttention, causal_mask, combine_masks, padding_mask, scaled_dot_product_attention

IMPLS = ["xla", "reference", "jax"]


@pytest.fixture(autouse=True)
def _one_device_policy(monkeypatch):
    """The suite runs with 8 CPU devices; the layer is tested here as a one-device process runs it (batch blocks, and
    the C++ kernel where built). `test_batch_sharded_jit_gathers_nothing` tests the several-device policy."""
    monkeypatch.setattr(common, "single_device", lambda: True)


def np_attention(q, k, v, mask=None, bias=None):
    """Textbook attention in float64 numpy; q [B, Tq, N, H], k/v [B, Tk, N, H], mask [B|1, N|1, Tq|1, Tk]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    w = e / np.where(z > 0, z, 1.0)
    return np.einsum("bnqk,bknh->bqnh", w, v), w


def qkv(seed, b, tq, tk, n, h, dtype=np.float32):
    r = np.random.default_rng(seed)
    return tuple(r.normal(size=(b, t, n, h)).astype(dtype) for t in (tq, tk, tk))


# ---------------------------------------------------------------------------------------------------------------- masks


def test_causal_mask_is_lower_triangular():
    m = causal_mask(5)
    assert m.shape == (1, 1, 5, 5) and m.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(m[0, 0]), np.tril(np.ones((5, 5), bool)))


def test_padding_mask_element_by_element():
    qv = np.array([[1, 1, 0], [1, 0, 0]], bool)
    kv = np.array([[1, 0, 1, 1], [1, 1, 1, 0]], bool)
    m = np.asarray(padding_mask(qv, kv))
    assert m.shape == (2, 1, 3, 4)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                assert m[b, 0, i, j] == (qv[b, i] and kv[b, j])
    np.testing.assert_array_equal(np.asarray(padding_mask(qv)), qv[:, None, :, None] & qv[:, None, None, :])


def test_combine_masks_broadcasts_and_ignores_none():
    pad = padding_mask(np.array([[1, 1, 1, 0]], bool))
    both = np.asarray(combine_masks(None, causal_mask(4), pad, None))
    assert both.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(both[0, 0], np.tril(np.ones((4, 4), bool)) & np.asarray(pad)[0, 0])
    assert combine_masks(None, None) is None
    with pytest.raises(ValueError, match="same rank"):
        combine_masks(causal_mask(3), jnp.ones((3, 3), bool))


# -------------------------------------------------------------------------------------------- scaled dot product


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "random_per_head"])
def test_sdpa_matches_numpy(impl, mask_kind):
    q, k, v = qkv(0, 3, 6, 6, 2, 4)
    r = np.random.default_rng(1)
    mask = {
        "none": None,
        "causal": np.asarray(causal_mask(6)),
        "padding": np.asarray(padding_mask(np.ones((3, 6), bool), r.random((3, 6)) > 0.3)),
        "random_per_head": r.random((3, 2, 6, 6)) > 0.4,
    }[mask_kind]
    out = scaled_dot_product_attention(q, k, v, mask, implementation=impl)
    ref, _ = np_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.slow_beyond(6)
@pytest.mark.parametrize(
    "shape",
    [
        (4, 10, 7, 2, 4),  # Tq not a multiple of the query block: padding path
        (6, 9, 9, 3, 2),
        (2, 33, 33, 1, 8),
    ],
)
@pytest.mark.parametrize("block_elements", [16, 64, 2**19])
def test_blocked_result_does_not_depend_on_blocking(shape, block_elements):
    b, tq, tk, n, h = shape
    q, k, v = qkv(2, b, tq, tk, n, h)
    mask = np.random.default_rng(3).random((b, 1, tq, tk)) > 0.3
    out = scaled_dot_product_attention(q, k, v, mask, block_elements=block_elements)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, mask)[0], rtol=2e-5, atol=2e-5)


def test_block_sizes_cover_the_batch_and_queries():
    assert _block_sizes(32, 8, 256, 256, 2**19) == (1, 256)
    assert _block_sizes(32, 8, 256, 256, 2**21) == (4, 256)
    bb, bq = _block_sizes(2, 8, 4096, 4096, 2**19)
    assert bb == 1 and bq * 8 * 4096 <= 2**19


def test_sdpa_extra_batch_dims_and_broadcast_mask():
    r = np.random.default_rng(4)
    q, k, v = (r.normal(size=(2, 3, 5, 2, 4)).astype(np.float32) for _ in range(3))
    mask = r.random((1, 3, 1, 5, 5)) > 0.3  # broadcast over the first batch dim and over heads
    out = scaled_dot_product_attention(q, k, v, mask)
    for i in range(2):
        ref, _ = np_attention(q[i], k[i], v[i], mask[0])
        np.testing.assert_allclose(np.asarray(out[i]), ref, rtol=2e-5, atol=2e-5)


def test_sdpa_matches_flax_dot_product_attention():
    q, k, v = qkv(5, 2, 7, 5, 3, 4)
    mask = np.random.default_rng(6).random((2, 3, 7, 5)) > 0.2
    mask[..., 0] = True  # flax returns a uniform average on fully masked rows; keep every row populated here
    ours = scaled_dot_product_attention(q, k, v, mask)
    theirs = nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_bias_and_return_weights():
    q, k, v = qkv(7, 2, 4, 6, 2, 4)
    r = np.random.default_rng(8)
    bias = r.normal(size=(1, 2, 4, 6)).astype(np.float32)
    mask = r.random((2, 1, 4, 6)) > 0.3
    out, w = scaled_dot_product_attention(q, k, v, mask, bias=bias, return_weights=True)
    ref, wref = np_attention(q, k, v, mask, bias)
    assert w.shape == (2, 2, 4, 6) and w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(w), wref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_row_gives_zeros_and_finite_gradients(impl):
    q, k, v = qkv(9, 2, 4, 4, 2, 4)
    mask = np.ones((2, 1, 4, 4), bool)
    mask[0, 0, 2, :] = False  # query 2 of example 0 sees nothing
    mask[1] = False  # example 1 sees nothing at all
    out = scaled_dot_product_attention(q, k, v, mask, implementation=impl)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(np.asarray(out[0, 2]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, mask)[0], rtol=2e-5, atol=2e-5)
    if impl != "jax":
        grads = jax.grad(lambda *a: jnp.sum(scaled_dot_product_attention(*a, mask, implementation=impl)), (0, 1, 2))(
            q, k, v
        )
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
        np.testing.assert_array_equal(np.asarray(grads[0][1]), 0.0)


def test_bf16_inputs_use_float32_softmax():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv(10, 2, 8, 8, 2, 16))
    # Large logits: a bf16 softmax would lose the small weights entirely.
    q = q * jnp.asarray(8.0, jnp.bfloat16)
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(8), return_weights=True)
    assert out.dtype == jnp.bfloat16 and w.dtype == jnp.float32
    ref, wref = np_attention(*(np.asarray(a.astype(jnp.float32)) for a in (q, k, v)), np.asarray(causal_mask(8)))
    np.testing.assert_allclose(np.asarray(w), wref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=2e-2, atol=2e-2)
    fast = scaled_dot_product_attention(q, k, v, causal_mask(8))
    np.testing.assert_allclose(np.asarray(fast.astype(jnp.float32)), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_causal_future_has_no_influence():
    q, k, v = qkv(11, 1, 6, 6, 2, 3)
    x = jnp.concatenate([jnp.asarray(a) for a in (q, k, v)], axis=-1)  # [1, T, N, 3H]

    def f(x):
        a, b, c = jnp.split(x, 3, axis=-1)
        return scaled_dot_product_attention(a, b, c, causal_mask(6))

    jac = np.asarray(jax.jacrev(f)(x))[0, :, :, :, 0]  # [T, N, H, T, N, 3H]
    for t in range(6):
        assert np.all(jac[t, :, :, t + 1 :] == 0.0), f"output {t} depends on a later input"
        assert np.any(jac[t, :, :, t] != 0.0)


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_gradients_float64(impl, x64):
    q, k, v = qkv(12, 2, 5, 6, 2, 3, np.float64)
    mask = np.random.default_rng(13).random((2, 2, 5, 6)) > 0.3
    mask[0, 0, 1] = False
    f = lambda q, k, v: scaled_dot_product_attention(q, k, v, mask, implementation=impl, block_elements=24)
    check_grads(f, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_gradients_float64_with_bias(x64):
    q, k, v = qkv(14, 1, 4, 4, 2, 3, np.float64)
    bias = np.random.default_rng(15).normal(size=(1, 2, 4, 4))
    check_grads(lambda *a: scaled_dot_product_attention(*a[:3], bias=a[3]), (q, k, v, bias), order=2, modes=["rev"])


@pytest.mark.slow
def test_dropout(rng):
    q, k, v = qkv(16, 2, 6, 6, 2, 4)
    kw = dict(dropout_rate=0.5, deterministic=False)
    a = scaled_dot_product_attention(q, k, v, dropout_rng=rng, **kw)
    b = scaled_dot_product_attention(q, k, v, dropout_rng=rng, **kw)
    c = scaled_dot_product_attention(q, k, v, dropout_rng=jax.random.fold_in(rng, 1), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    no_drop = scaled_dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=0.5, deterministic=True)
    np.testing.assert_allclose(np.asarray(no_drop), np_attention(q, k, v)[0], rtol=2e-5, atol=2e-5)
    # Inverted dropout is unbiased: the mean over many masks approaches the deterministic output.
    for impl in ("xla", "reference"):
        sample = jax.vmap(
            lambda key, impl=impl: scaled_dot_product_attention(q, k, v, dropout_rng=key, implementation=impl, **kw)
        )
        outs = sample(jax.random.split(rng, 2000))
        np.testing.assert_allclose(np.asarray(outs.mean(0)), np.asarray(no_drop), atol=0.1)
    with pytest.raises(ValueError, match="dropout_rng"):
        scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_dropout_at_rate_0_2_drops_a_fifth_and_scales_survivors(impl):
    """At rate 0.5 keep and drop (and 1/p and 1/(1-p)) coincide; at 0.2 they do not. One-hot values make the
    output the dropped weights themselves: about 20% zeros (within 5 standard errors), survivors w / 0.8."""
    b, t, n = 4, 16, 2
    q, k, _ = qkv(19, b, t, t, n, 4)
    v = np.broadcast_to(np.eye(t, dtype=np.float32)[None, :, None, :], (b, t, n, t))  # value j = e_j
    call = lambda **kw: np.asarray(
        scaled_dot_product_attention(q, k, v, implementation=impl, block_elements=128, **kw)
    )  # [B, Tq, N, Tk]
    weights = call()
    out = call(dropout_rate=0.2, dropout_rng=jax.random.key(20), deterministic=False)
    dropped = out == 0.0
    assert abs(dropped.mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / out.size), dropped.mean()
    np.testing.assert_allclose(out[~dropped], weights[~dropped] / 0.8, rtol=1e-5)


@pytest.mark.slow
def test_dropout_gradients_match_their_forward(rng, x64):
    """The blocked kernel regenerates the dropout mask in its backward pass; check it is the forward's mask."""
    q, k, v = qkv(17, 2, 5, 5, 2, 3, np.float64)
    f = lambda q, k, v: scaled_dot_product_attention(
        q, k, v, causal_mask(5), dropout_rate=0.3, dropout_rng=rng, deterministic=False, block_elements=20
    )
    check_grads(f, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        (((2, 4, 8), (2, 4, 2, 4), (2, 4, 2, 4)), "same rank"),
        (((2, 4, 2, 4), (2, 5, 2, 4), (2, 6, 2, 4)), r"\(2, 5, 2, 4\)"),
        (((2, 4, 2, 4), (2, 4, 3, 4), (2, 4, 3, 4)), "heads"),
        (((2, 4, 2, 4), (2, 4, 2, 8), (2, 4, 2, 8)), "head dim"),
        (((3, 4, 2, 4), (2, 4, 2, 4), (2, 4, 2, 4)), r"\(3, 4, 2, 4\)"),
    ],
)
def test_bad_shapes_name_the_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        scaled_dot_product_attention(*(jnp.zeros(s) for s in args))


def test_bad_mask_names_the_shapes():
    q = jnp.zeros((2, 4, 2, 8))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 4, 5\).*\(2, 2, 4, 4\)"):
        scaled_dot_product_attention(q, q, q, jnp.ones((2, 1, 4, 5), bool))
    with pytest.raises(ValueError, match="boolean"):
        scaled_dot_product_attention(q, q, q, jnp.ones((2, 1, 4, 4), jnp.float32))
    with pytest.raises(ValueError, match="implementation"):
        scaled_dot_product_attention(q, q, q, implementation="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            scaled_dot_product_attention(q, q, q, implementation="cudnn")


# ---------------------------------------------------------------------------------------------- multi-head attention


def _flax_mha(**kw):
    return nn.MultiHeadDotProductAttention(**kw)


@pytest.mark.parametrize("fuse_qkv", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_mha_self_attention_matches_flax(rng, fuse_qkv, impl):
    x = jax.random.normal(rng, (2, 6, 12))
    ours = MultiHeadAttention(num_heads=3, fuse_qkv=fuse_qkv, implementation=impl)
    theirs = _flax_mha(num_heads=3)
    params = theirs.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(1), x))
    for mask in (None, causal_mask(6)):
        np.testing.assert_allclose(
            np.asarray(ours.apply(params, x, mask=mask)),
            np.asarray(theirs.apply(params, x, mask=mask)),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.slow
def test_mha_cross_attention_features_and_no_bias_match_flax(rng):
    kq, kkv = jax.random.split(rng)
    xq, xkv = jax.random.normal(kq, (2, 3, 5, 6)), jax.random.normal(kkv, (2, 3, 7, 10))
    kw = dict(num_heads=2, qkv_features=8, out_features=4, use_bias=False)
    ours, theirs = MultiHeadAttention(**kw), _flax_mha(**kw)
    params = theirs.init(jax.random.key(2), xq, xkv)
    mask = padding_mask(jnp.ones((2, 5), bool), jnp.arange(7)[None] < jnp.array([[7], [4]]))[:, None]
    out = ours.apply(params, xq, xkv, mask=mask)
    assert out.shape == (2, 3, 5, 4)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(theirs.apply(params, xq, xkv, mask=mask)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_mha_sows_attention_weights(rng):
    x = jax.random.normal(rng, (2, 5, 8))
    m = MultiHeadAttention(num_heads=2)
    params = m.init(jax.random.key(3), x)
    out, state = m.apply(params, x, mask=causal_mask(5), mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-6)
    assert np.all(np.asarray(w)[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(m.apply(params, x, mask=causal_mask(5))), atol=1e-6)


@pytest.mark.slow
def test_mha_causal_jacobian_blocks_the_future(rng):
    x = jax.random.normal(rng, (1, 6, 8))
    m = MultiHeadAttention(num_heads=2)
    params = m.init(jax.random.key(4), x)
    jac = np.asarray(jax.jacrev(lambda x: m.apply(params, x, mask=causal_mask(6)))(x))[0, :, :, 0]  # [T, D, T, D]
    for t in range(6):
        assert np.all(jac[t, :, t + 1 :] == 0.0)
        assert np.any(jac[t, :, : t + 1] != 0.0)


def test_mha_dropout_needs_rng_and_is_off_when_deterministic(rng):
    x = jax.random.normal(rng, (2, 5, 8))
    m = MultiHeadAttention(num_heads=2, dropout_rate=0.5)
    params = m.init(jax.random.key(5), x)
    base = m.apply(params, x)
    a = m.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(6)})
    assert not np.allclose(np.asarray(a), np.asarray(base))
    with pytest.raises(Exception, match='needs PRNG for "dropout"'):  # flax.errors.InvalidRngError
        m.apply(params, x, deterministic=False)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(m.apply(params, x, deterministic=True)))


@pytest.mark.slow
def test_mha_dtypes(rng):
    x = jax.random.normal(rng, (2, 4, 8))
    m = MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = m.init(jax.random.key(7), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = m.apply(params, x)
    assert out.dtype == jnp.bfloat16
    ref = MultiHeadAttention(num_heads=2).apply(params, x)
    # Measured: 0.006 at most (outputs up to 0.7); 3x that.
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.018, rtol=0)


@pytest.mark.slow
def test_mha_float64_gradients(x64):
    x = np.random.default_rng(18).normal(size=(2, 4, 6))
    m = MultiHeadAttention(num_heads=2, param_dtype=jnp.float64)
    params = m.init(jax.random.key(8), x)
    check_grads(lambda p, x: m.apply(p, x, mask=causal_mask(4)), (params, x), order=1, modes=["rev"])


@pytest.mark.slow
def test_mha_bad_config_names_the_shapes(rng):
    x = jnp.zeros((2, 4, 10))
    with pytest.raises(ValueError, match=r"qkv_features \(10\) must be divisible by num_heads \(3\)"):
        MultiHeadAttention(num_heads=3).init(rng, x)
    with pytest.raises(ValueError, match=r"\(2, 4, 10\).*\(3, 4, 10\)"):
        MultiHeadAttention(num_heads=2).init(rng, x, jnp.zeros((3, 4, 10)))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 4, 3\)"):
        MultiHeadAttention(num_heads=2).init(rng, x, mask=jnp.ones((2, 1, 4, 3), bool))


# ---------------------------------------------------------------------------------------------------- KV cache


@pytest.mark.slow_beyond(2)
@pytest.mark.parametrize("prefill", [0, 1, 4])
def test_cached_decoding_equals_the_full_causal_pass(rng, prefill):
    b, length, f = 2, 7, 8
    x = jax.random.normal(rng, (b, length, f))
    full_model = MultiHeadAttention(num_heads=2)
    params = full_model.init(jax.random.key(9), x)["params"]
    full = full_model.apply({"params": params}, x, mask=causal_mask(length))

    dec = MultiHeadAttention(num_heads=2, decode=True)
    cache = dec.init(jax.random.key(9), jnp.zeros((b, length, f)))["cache"]
    outs, t = [], 0
    if prefill:
        y, upd = dec.apply({"params": params, "cache": cache}, x[:, :prefill], mutable=["cache"])
        outs.append(y)
        cache, t = upd["cache"], prefill
    step = jax.jit(lambda cache, xt: dec.apply({"params": params, "cache": cache}, xt, mutable=["cache"]))
    while t < length:
        y, upd = step(cache, x[:, t : t + 1])
        outs.append(y)
        cache, t = upd["cache"], t + 1
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert int(cache["cache_index"]) == length


def test_cache_overflow_and_cross_attention_errors(rng):
    dec = MultiHeadAttention(num_heads=2, decode=True)
    variables = dec.init(rng, jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match=r"do not fit the cache"):
        dec.apply(variables, jnp.zeros((2, 4, 8)), mutable=["cache"])
    with pytest.raises(ValueError, match="self-attention"):
        dec.init(rng, jnp.zeros((2, 3, 8)), jnp.zeros((2, 3, 8)))


@pytest.mark.slow
def test_mha_dropout_gradients_match_their_forward(x64):
    x = np.random.default_rng(19).normal(size=(2, 5, 6))
    m = MultiHeadAttention(num_heads=2, dropout_rate=0.4, param_dtype=jnp.float64)
    params = m.init(jax.random.key(10), x)
    f = lambda p, x: m.apply(p, x, mask=causal_mask(5), deterministic=False, rngs={"dropout": jax.random.key(11)})
    check_grads(f, (params, x), order=1, modes=["rev"])


def test_long_sequences_use_query_blocks(rng):
    """N*T*T above the block budget: the kernel blocks queries too; the result is the same function."""
    q, k, v = qkv(20, 1, 300, 300, 2, 4)
    mask = np.asarray(causal_mask(300))
    assert _block_sizes(1, 2, 300, 300, 2**16)[1] < 300
    out = scaled_dot_product_attention(q, k, v, mask, block_elements=2**16)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, mask)[0], rtol=2e-5, atol=2e-5)


@pytest.mark.slow_beyond(2)
@pytest.mark.parametrize("native", [False, True], ids=["xla-kernel", "cpu-kernel"])
@pytest.mark.parametrize("shape, heads", [((2, 384, 8), 2), ((16, 256, 4), 1)])
def test_mha_above_one_block_matches_flax(rng, shape, heads, native, monkeypatch):
    """Big enough (B*N*T*T > 2**19) for the blocked kernel inside MultiHeadAttention, forward and gradients: the XLA
    fused self-attention kernel (whose backward emits d(qkv) directly; blocks of one and of eight batch rows), and
    the C++ CPU kernel that replaces it on CPU in float32 without dropout."""
    from seqjax.kernels import cpu

    b, t, _ = shape
    assert _block_sizes(b, heads, t, t, 2**19) == ((1, t) if b == 2 else (8, t))
    calls = []
    if native:
        if not cpu.available():
            pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
        kernel = cpu_attention.qkv_attention
        monkeypatch.setattr(cpu_attention, "qkv_attention", lambda *a: calls.append("C++") or kernel(*a))
    else:
        monkeypatch.setattr(cpu_attention, "applies", lambda *a: False)
        fused = blocked_kernel._qkv_attention
        monkeypatch.setattr(blocked_kernel, "_qkv_attention", lambda *a: calls.append(a[6]) or fused(*a))
    x = jax.random.normal(rng, shape)
    ours, theirs = MultiHeadAttention(num_heads=heads), _flax_mha(num_heads=heads)
    params = theirs.init(jax.random.key(12), x)

    def loss(module):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, mask=causal_mask(t))))))

    (a, ga), (b, gb) = loss(ours)(params, x), loss(theirs)(params, x)
    assert calls == (["C++"] if native else [1 if shape[0] == 2 else 8])  # that kernel ran (XLA: blocks of rows)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 520, 4), (2, 384, 4)])
def test_mha_above_one_block_dropout_gradients(x64, shape):
    """The kernel paths of MultiHeadAttention (query blocks; the fused one, whole rows) regenerate their dropout masks
    in the backward pass."""
    assert (_block_sizes(shape[0], 2, shape[1], shape[1], 2**19)[1] == shape[1]) == (shape[1] == 384)
    x = np.random.default_rng(21).normal(size=shape)
    m = MultiHeadAttention(num_heads=2, dropout_rate=0.3, param_dtype=jnp.float64)
    params = m.init(jax.random.key(13), x)
    f = jax.jit(lambda p, x: m.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(14)}))
    check_grads(f, (params, x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fused_self_attention_equals_the_blocked_kernel(rng):
    """The fused self-attention kernel (d(qkv) emitted in the projection's layout) computes what the blocked kernel
    computes on q, k, v sliced out of it: outputs and gradients, with dropout, a per-row padding mask combined with
    the causal one, and blocks of eight rows."""
    b, t, n, h = 16, 256, 1, 4
    bb, bq = _block_sizes(b, n, t, t, 2**19)
    assert (bb, bq) == (8, t)
    qkv = jax.random.normal(rng, (b, t, 3, n, h))
    lengths = np.random.default_rng(3).integers(1, t + 1, b)
    mask = combine_masks(causal_mask(t), padding_mask(jnp.arange(t)[None] < lengths[:, None]))  # [B, 1, T, T]
    key = jax.random.key(4)

    def fused(qkv):
        return blocked_kernel._qkv_attention(qkv, mask, None, key, 0.2, None, bb, False)

    def blocked(qkv):
        hm = jnp.moveaxis(qkv, 1, 3)
        return blocked_kernel._run_blocked(hm[:, 0], hm[:, 1], hm[:, 2], mask, None, False, 0.2, key, None, 2**19, True)

    for f in (lambda g: jnp.sum(jnp.sin(g(qkv))), lambda g: jax.grad(lambda x: jnp.sum(jnp.sin(g(x))))(qkv)):
        np.testing.assert_allclose(np.asarray(jax.jit(f, static_argnums=0)(fused)),
                                   np.asarray(jax.jit(f, static_argnums=0)(blocked)), rtol=1e-6, atol=1e-7)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("several_devices", [True, False])
def test_batch_sharded_jit_gathers_nothing(several_devices, monkeypatch):
    """With several devices the kernel's blocks hold the whole batch and run over queries only, so that under a jit
    whose batch is sharded over 8 devices XLA partitions the attention without gathering q, k, v (the one-device
    policy, blocks of batch rows, makes it gather them, which this test shows as the failing case)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(common, "single_device", lambda: not several_devices)
    monkeypatch.setattr(cpu_attention, "applies", lambda *a: False)  # the blocked kernel's block policies
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.random.normal(jax.random.key(0), (16, 256, 32))
    assert _block_sizes(16, 2, 256, 256, 2**19) == (4, 256)  # above one block: blocks of 4 rows
    assert _block_sizes(16, 2, 256, 256, 2**19, split_batch=False) == (16, 64)  # or of 64 queries of all rows
    m = MultiHeadAttention(num_heads=2)
    params = m.init(jax.random.key(1), x)
    step = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x, mask=causal_mask(256)))), (0, 1)))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    hlo = step.lower(params, sharded).compile().as_text()
    assert ("all-gather" not in hlo) == several_devices
    (loss, grads), (ref_loss, ref_grads) = step(params, sharded), step(params, x)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for u, w in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)
