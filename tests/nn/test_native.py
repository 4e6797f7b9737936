"""seqjax's C++ CPU kernels (seqjax/nn/_native): the attention kernel against a float64 numpy reference and against
autodiff of a plain JAX formulation, its XLA fallback branch, vmap, and the build's side conditions.

Where the kernels cannot be built (no C++ compiler) these tests skip, except under CI (`CI` set), where the
kernels are expected and their absence fails."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn import _native, attention
from seqjax.nn.attention import causal_mask
from tests.nn.test_attention import np_attention


@pytest.fixture(autouse=True)
def _kernels():
    if not _native.available():
        if os.environ.get("CI"):
            pytest.fail(f"CPU kernels unavailable under CI: {_native.unavailable_reason()}")
        pytest.skip(f"CPU kernels unavailable: {_native.unavailable_reason()}")


B, T, N, H = 3, 150, 2, 8  # T: with a mask the kernel takes queries 64 at a time (two whole blocks and a part)


def _qkv(seed=0, t=T):
    return jax.random.normal(jax.random.key(seed), (B, t, 3, N, H), jnp.float32)


def _masks(t=T):
    r = np.random.default_rng(3)
    causal = np.asarray(causal_mask(t))  # [1, 1, T, T]
    padding = (np.arange(t)[None] < np.array([t, 17, 1])[:, None])[:, None, None, :]  # [B, 1, 1, T]
    per_head = r.random((B, N, t, t)) < 0.7
    per_head[1, 0, 5] = False  # a fully masked query: zero output, zero gradient, never NaN
    per_head[2, 1, :3] = False
    per_head[0, 1, 64:128] = False  # (T=150) a whole block of queries that attends nothing
    queries = (np.arange(t)[None] < np.array([t, 30, 9])[:, None])[:, None, :, None]  # [B, 1, T, 1]: over the keys
    return {"none": None, "causal": causal, "padding": padding, "per-head": per_head, "queries": queries}


def _jax_reference(qkv, mask):
    """Plain JAX softmax attention on q already scaled (scale 1), fully masked rows giving zeros."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = jnp.einsum("bqnh,bknh->bnqk", q, k)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    z = e.sum(-1, keepdims=True)
    return jnp.einsum("bnqk,bknh->bqnh", e / jnp.where(z > 0, z, 1.0), v)


@pytest.mark.parametrize("t", [40, T], ids=["one-block", "three-blocks"])
@pytest.mark.parametrize("kind", ["none", "causal", "padding", "per-head", "queries"])
def test_attention_kernel_matches_references(kind, t):
    qkv, mask = _qkv(0, t), _masks(t)[kind]
    jmask = None if mask is None else jnp.asarray(mask)
    f = jax.jit(lambda x: attention._native_self_attention(x, jmask, None))
    assert "seqjax_attention_forward" in f.lower(qkv).as_text()
    out = f(qkv)
    q, k, v = (np.asarray(qkv[:, :, i], np.float64) for i in range(3))
    expected, _ = np_attention(q * np.sqrt(H), k, v, mask)  # np_attention scales by 1/sqrt(H) itself
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-6)

    dout = jax.random.normal(jax.random.key(1), out.shape)
    grad = lambda fn: jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * dout)))(qkv)
    ours, theirs = (
        grad(lambda x: attention._native_self_attention(x, jmask, None)),
        grad(lambda x: _jax_reference(x, jmask)),
    )
    assert not np.isnan(np.asarray(ours)).any()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=2e-4, atol=2e-5)
    if kind == "per-head":  # fully masked queries have zero outputs and pass no gradient to their own q
        np.testing.assert_array_equal(np.asarray(out[1, 5, 0]), 0.0)
        np.testing.assert_array_equal(np.asarray(ours[1, 5, 0, 0]), 0.0)
        np.testing.assert_array_equal(np.asarray(out[0, 64:128, 1]), 0.0)
        np.testing.assert_array_equal(np.asarray(ours[0, 64:128, 0, 1]), 0.0)
    if kind == "padding":  # keys that no query may attend get exactly zero dk, dv (here one block can cover all)
        np.testing.assert_array_equal(np.asarray(ours[1, 17:, 1:]), 0.0)
        np.testing.assert_array_equal(np.asarray(ours[2, 1:, 1:]), 0.0)


def test_attention_kernel_masked_keys_get_no_gradient():
    """Keys that no query may attend receive exactly zero gradient: the mask truly blocks them."""
    qkv = _qkv(4)
    mask = jnp.asarray(np.arange(T) < 100)[None, None, None, :]  # keys 100.. are padding for every query
    g = jax.grad(lambda x: jnp.sum(jnp.sin(attention._native_self_attention(x, mask, None))))(qkv)
    np.testing.assert_array_equal(np.asarray(g[:, 100:, 1:]), 0.0)  # dk and dv of the padded keys
    assert np.abs(np.asarray(g[:, :100, 1:])).max() > 0


def test_attention_kernel_gradients_of_gradients():
    """The kernel's backward pass can itself be differentiated (its custom calls carry the plain-JAX formulation's
    derivatives): the gradient of a gradient penalty equals that of autodiff through plain attention."""
    qkv, mask = _qkv(11, 70), jnp.asarray(_masks(70)["causal"])

    def penalty(attend):
        return lambda x: jnp.sum(jnp.square(jax.grad(lambda y: jnp.sum(jnp.sin(attend(y))))(x)))

    ours = jax.jit(jax.grad(penalty(lambda y: attention._native_self_attention(y, mask, None))))(qkv)
    theirs = jax.jit(jax.grad(penalty(lambda y: _jax_reference(y, mask))))(qkv)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=2e-3, atol=2e-4)


def test_attention_fallback_branch_is_the_same_function(monkeypatch):
    """Lowered for a platform other than CPU, the forward and backward take the XLA kernel's branch; run here by
    making `platform_dependent` pick that branch, it gives the same output and gradients."""
    qkv, mask = _qkv(5), jnp.asarray(_masks()["per-head"])
    loss = lambda x: jnp.sum(jnp.sin(attention._native_self_attention(x, mask, None)))
    native = jax.value_and_grad(loss)(qkv)
    monkeypatch.setattr(attention.lax, "platform_dependent", lambda *a, default, **kw: default(*a))
    fallback = jax.jit(jax.value_and_grad(loss))
    assert "seqjax_attention" not in fallback.lower(qkv).as_text()
    for u, w in zip(native, fallback(qkv), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)


def test_long_sequences_run_the_kernel_and_match_the_xla_kernel(monkeypatch):
    """Past the XLA kernel's whole-row blocks (T=384 with 4 heads blocks queries there), MultiHeadAttention still
    runs the C++ kernel, up to NATIVE_MAX_LENGTH positions, with the XLA kernel's outputs and gradients."""
    monkeypatch.setattr(attention, "_single_device", lambda: True)
    x = jax.random.normal(jax.random.key(8), (2, 384, 16))
    assert attention._block_sizes(2, 4, 384, 384, 2**19)[1] < 384
    m = attention.MultiHeadAttention(num_heads=4)
    params = m.init(jax.random.key(9), x)
    step = lambda: jax.jit(
        jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x, mask=causal_mask(384)))), (0, 1))
    )
    native = step()
    assert "seqjax_attention_backward" in native.lower(params, x).as_text()
    ours = native(params, x)
    use = attention._use_native_attention
    monkeypatch.setattr(attention, "_use_native_attention", lambda *a: False)
    theirs = step()(params, x)
    for u, w in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)
    q = jnp.ones((1, 8, 3, 1, 4))
    assert use(q, 0.0, attention.NATIVE_MAX_LENGTH)
    assert not use(q, 0.0, attention.NATIVE_MAX_LENGTH + 1)
    assert not use(q, 0.1, 8)  # dropout: the XLA kernel
    assert not use(q.astype(jnp.bfloat16), 0.0, 8)


def test_attention_kernel_under_vmap():
    qkvs, mask = jnp.stack([_qkv(6), _qkv(7)]), jnp.asarray(_masks()["padding"])
    f = lambda x: attention._native_self_attention(x, mask, None)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))
    batched, batched_grads = jax.vmap(f)(qkvs), jax.vmap(g)(qkvs)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(f(qkvs[i])), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(batched_grads[i]), np.asarray(g(qkvs[i])), rtol=1e-6, atol=1e-7)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


def test_loading_the_kernels_keeps_subnormal_floats():
    """The library is compiled with -ffast-math but not linked with it: linking with it adds crtfastmath.o, which
    switches the loading thread to flush-to-zero arithmetic (checked by hand: numpy's 1.4e-45 * 1.5 then gives 0)."""
    code = """
import numpy as np
from seqjax.nn import _native
assert _native.available(), _native.unavailable_reason()
tiny = np.finfo(np.float32).smallest_subnormal
print(np.float32(tiny) * np.float32(1.5) > 0)
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr


def test_disabled_kernels_fall_back_to_xla():
    code = """
import jax, jax.numpy as jnp
from seqjax.nn import _native, MultiHeadAttention
print(_native.available(), _native.unavailable_reason())
x = jnp.ones((4, 256, 16))
m = MultiHeadAttention(num_heads=4)
out = m.apply(m.init(jax.random.key(0), x), x)
print(out.shape, "seqjax_attention" in jax.jit(m.apply).lower(m.init(jax.random.key(0), x), x).as_text())
"""
    proc = _python(code, SEQJAX_NATIVE="0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "False RuntimeError: disabled by SEQJAX_NATIVE=0"
    assert lines[1] == "(4, 256, 16) False"


def test_module_runs_the_kernel_with_one_device_only():
    """MultiHeadAttention's self-attention lowers to the custom call in a process with one CPU device, and not in
    this test process (8 CPU devices), where a batch-sharded jit would have to gather the batch for it."""
    code = """
import jax, jax.numpy as jnp
from seqjax.nn import MultiHeadAttention
x = jnp.ones((4, 256, 16))
m = MultiHeadAttention(num_heads=4)
print(jax.device_count(), "seqjax_attention" in jax.jit(m.apply).lower(m.init(jax.random.key(0), x), x).as_text())
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "True"], proc.stderr
    assert jax.device_count() == 8
    x = jnp.ones((4, 256, 16))
    m = attention.MultiHeadAttention(num_heads=4)
    assert "seqjax_attention" not in jax.jit(m.apply).lower(m.init(jax.random.key(0), x), x).as_text()


def test_kernels_build_into_the_cache_folder(tmp_path):
    proc = _python("from seqjax.nn import _native; print(_native.available())", SEQJAX_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # the library, and no leftover build folder
