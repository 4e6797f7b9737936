"""seqjax's C++ CPU kernels (seqjax/kernels/cpu): the attention kernel against a float64 numpy reference and against
autodiff of a plain JAX formulation; the LSTM and GRU kernels against the scanned cells' autodiff, `fused_lstm` /
`fused_gru` and torch;
their XLA fallback branches, vmap, gradients of gradients, and the build's side conditions.

Where the kernels cannot be built (no C++ compiler) these tests skip, except under CI (`CI` set), where the
kernels are expected and their absence fails."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.kernels import blocked, common, cpu, fused_gru, fused_lstm
from seqjax.kernels.cpu import attention as cpu_attention
from seqjax.kernels.cpu import gru as cpu_gru
from seqjax.kernels.cpu import lstm as cpu_lstm
from seqjax.nn import MultiHeadAttention
from seqjax.nn.attention import causal_mask
from seqjax.nn.recurrent import RNN, GRUCell, LSTMCell
from tests.nn.test_attention import np_attention


@pytest.fixture(autouse=True)
def _kernels():
    if not cpu.available():
        if os.environ.get("CI"):
            pytest.fail(f"CPU kernels unavailable under CI: {cpu.unavailable_reason()}")
        pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")


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


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("t", [40, T], ids=["one-block", "three-blocks"])
@pytest.mark.parametrize("kind", ["none", "causal", "padding", "per-head", "queries"])
def test_attention_kernel_matches_references(kind, t):
    qkv, mask = _qkv(0, t), _masks(t)[kind]
    jmask = None if mask is None else jnp.asarray(mask)
    f = jax.jit(lambda x: cpu_attention.qkv_attention(x, jmask, None))
    assert "seqjax_attention_forward" in f.lower(qkv).as_text()
    out = f(qkv)
    q, k, v = (np.asarray(qkv[:, :, i], np.float64) for i in range(3))
    expected, _ = np_attention(q * np.sqrt(H), k, v, mask)  # np_attention scales by 1/sqrt(H) itself
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-6)

    dout = jax.random.normal(jax.random.key(1), out.shape)
    grad = lambda fn: jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * dout)))(qkv)
    ours, theirs = (
        grad(lambda x: cpu_attention.qkv_attention(x, jmask, None)),
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
    g = jax.grad(lambda x: jnp.sum(jnp.sin(cpu_attention.qkv_attention(x, mask, None))))(qkv)
    np.testing.assert_array_equal(np.asarray(g[:, 100:, 1:]), 0.0)  # dk and dv of the padded keys
    assert np.abs(np.asarray(g[:, :100, 1:])).max() > 0


@pytest.mark.slow
def test_attention_kernel_gradients_of_gradients():
    """The kernel's backward pass can itself be differentiated (its custom calls carry the plain-JAX formulation's
    derivatives): the gradient of a gradient penalty equals that of autodiff through plain attention."""
    qkv, mask = _qkv(11, 70), jnp.asarray(_masks(70)["causal"])

    def penalty(attend):
        return lambda x: jnp.sum(jnp.square(jax.grad(lambda y: jnp.sum(jnp.sin(attend(y))))(x)))

    ours = jax.jit(jax.grad(penalty(lambda y: cpu_attention.qkv_attention(y, mask, None))))(qkv)
    theirs = jax.jit(jax.grad(penalty(lambda y: _jax_reference(y, mask))))(qkv)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=2e-3, atol=2e-4)
    # forward over reverse (Hessian-vector products)
    v = jax.random.normal(jax.random.key(12), qkv.shape)

    def hvp(attend):
        grad = jax.grad(lambda y: jnp.sum(jnp.sin(attend(y))))
        return jax.jit(lambda: jax.jvp(grad, (qkv,), (v,))[1])()

    ours = hvp(lambda y: cpu_attention.qkv_attention(y, mask, None))
    np.testing.assert_allclose(
        np.asarray(ours), np.asarray(hvp(lambda y: _jax_reference(y, mask))), rtol=2e-3, atol=2e-4
    )


def test_attention_fallback_branch_is_the_same_function(monkeypatch):
    """Lowered for a platform other than CPU, the forward and backward take the XLA kernel's branch; run here by
    making `platform_dependent` pick that branch, it gives the same output and gradients."""
    qkv, mask = _qkv(5), jnp.asarray(_masks()["per-head"])
    loss = lambda x: jnp.sum(jnp.sin(cpu_attention.qkv_attention(x, mask, None)))
    native = jax.value_and_grad(loss)(qkv)
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *a, default, **kw: default(*a))
    fallback = jax.jit(jax.value_and_grad(loss))
    assert "seqjax_attention" not in fallback.lower(qkv).as_text()
    for u, w in zip(native, fallback(qkv), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_long_sequences_run_the_kernel_and_match_the_xla_kernel(monkeypatch):
    """Past the XLA kernel's whole-row blocks (T=384 with 4 heads blocks queries there), MultiHeadAttention still
    runs the C++ kernel, up to NATIVE_MAX_LENGTH positions, with the XLA kernel's outputs and gradients."""
    monkeypatch.setattr(common, "single_device", lambda: True)
    x = jax.random.normal(jax.random.key(8), (2, 384, 16))
    assert blocked.block_sizes(2, 4, 384, 384, 2**19)[1] < 384
    m = MultiHeadAttention(num_heads=4)
    params = m.init(jax.random.key(9), x)
    step = lambda: jax.jit(
        jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x, mask=causal_mask(384)))), (0, 1))
    )
    native = step()
    assert "seqjax_attention_backward" in native.lower(params, x).as_text()
    ours = native(params, x)
    use = cpu_attention.applies
    monkeypatch.setattr(cpu_attention, "applies", lambda *a: False)
    theirs = step()(params, x)
    for u, w in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)
    q = jnp.ones((1, 8, 3, 1, 4))
    assert use(q, 0.0, cpu_attention.MAX_LENGTH)
    assert not use(q, 0.0, cpu_attention.MAX_LENGTH + 1)
    assert not use(q, 0.1, 8)  # dropout: the XLA kernel
    assert not use(q.astype(jnp.bfloat16), 0.0, 8)


def test_attention_kernel_under_vmap():
    qkvs, mask = jnp.stack([_qkv(6), _qkv(7)]), jnp.asarray(_masks()["padding"])
    f = lambda x: cpu_attention.qkv_attention(x, mask, None)
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
from seqjax.kernels import cpu
assert cpu.available(), cpu.unavailable_reason()
tiny = np.finfo(np.float32).smallest_subnormal
print(np.float32(tiny) * np.float32(1.5) > 0)
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr


@pytest.mark.slow
def test_disabled_kernels_fall_back_to_xla():
    code = """
import jax, jax.numpy as jnp
from seqjax.kernels import cpu
from seqjax.nn import MultiHeadAttention
print(cpu.available(), cpu.unavailable_reason())
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


@pytest.mark.slow
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
    m = MultiHeadAttention(num_heads=4)
    assert "seqjax_attention" not in jax.jit(m.apply).lower(m.init(jax.random.key(0), x), x).as_text()


@pytest.mark.slow
def test_kernels_build_into_the_cache_folder(tmp_path):
    proc = _python("from seqjax.kernels import cpu; print(cpu.available())", SEQJAX_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # the library, and no leftover build folder


# ---------------------------------------------------------------------------------------------------------------
# The LSTM and GRU kernels (lstm.cc, gru.cc). Sizes that exercise their edges: batch rows not a multiple of the
# micro-kernel's 6, hidden units not a multiple of its 16 (a padded last block), and enough blocks for the units to
# be split between threads.

RNN_SHAPES = [(7, 9, 5, 20), (13, 4, 33, 70), (1, 3, 2, 1)]  # (B, T, F, H)
KINDS = ["lstm", "gru"]


@pytest.fixture
def one_device(monkeypatch):
    """The suite runs with 8 CPU devices; the layers are run here as a one-device process runs them."""
    monkeypatch.setattr(common, "single_device", lambda: True)
    if not cpu.recurrent_vectorised():
        pytest.skip("the recurrent kernels are built without their AVX2/FMA micro-kernel on this CPU, so unused")


def _layer_args(kind, b, t, f, h, seed=0):
    """Arguments of fused_lstm (x, c0, h0, w_ih, w_hh, b) or fused_gru (x, h0, w_ih, w_hh, b_ih, b_hh)."""
    k = jax.random.split(jax.random.key(seed), 7)
    g = 4 if kind == "lstm" else 3
    x = jax.random.normal(k[0], (b, t, f))
    w_ih, w_hh = jax.random.normal(k[3], (f, g * h)) / np.sqrt(f), jax.random.normal(k[4], (h, g * h)) / np.sqrt(h)
    carry = [0.5 * jax.random.normal(k[i], (b, h)) for i in ((1, 2) if kind == "lstm" else (1,))]
    biases = [0.3 * jax.random.normal(k[i], (g * h,)) for i in ((5,) if kind == "lstm" else (5, 6))]
    return (x, *carry, w_ih, w_hh, *biases)


def _layers(kind):
    """(the kernel's custom_vjp, the XLA formulation) of one kind."""
    if kind == "lstm":
        return cpu_lstm.lstm, fused_lstm
    return cpu_gru.gru, fused_gru


def _layer_loss(layer, seed=1):
    """A loss reaching every output: all steps' outputs (weighted) and the whole final carry."""

    def loss(*args):
        ys, carry = layer(*args)
        w = jax.random.normal(jax.random.key(seed), ys.shape)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin((i + 1.0) * c)) for i, c in enumerate(jax.tree.leaves(carry)))

    return loss


# every reverse / bias combination on the first shape (they change the layer around the kernel, not the kernel)
SCANNED_CASES = [(RNN_SHAPES[0], r, u) for r in (False, True) for u in (True, False)]
SCANNED_CASES += [(RNN_SHAPES[1], False, True), (RNN_SHAPES[2], True, False)]


@pytest.mark.slow_beyond(4)
@pytest.mark.parametrize("shape, reverse, use_bias", SCANNED_CASES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_equals_the_scanned_cell(one_device, kind, shape, reverse, use_bias):
    """RNN(LSTMCell / GRUCell) without lengths runs the kernel: outputs, final carry and every gradient (parameters,
    inputs, initial carry) equal autodiff through the nn.scan of the cell (itself checked against numpy's
    equations); not differentiated, it runs the forward that saves nothing for a backward pass."""
    b, t, _, h = shape
    x, *carry0 = _layer_args(kind, *shape)[: 3 if kind == "lstm" else 2]
    carry0 = tuple(carry0) if kind == "lstm" else carry0[0]
    cell = LSTMCell(h, use_bias=use_bias, forget_bias=1.0) if kind == "lstm" else GRUCell(h, use_bias=use_bias)
    native, plain = (RNN(cell, reverse=reverse, return_carry=True, fused=fu) for fu in (True, False))
    params = plain.init(jax.random.key(2), x)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(3), a.shape), params)
    wy = jax.random.normal(jax.random.key(4), (b, t, h))

    def loss(rnn, p, x, carry0):
        carry, ys = rnn.apply(p, x, initial_carry=carry0)
        return jnp.sum(ys * wy) + sum(jnp.sum(jnp.sin((i + 1.0) * c)) for i, c in enumerate(jax.tree.leaves(carry)))

    step = jax.jit(jax.value_and_grad(lambda *a: loss(native, *a), argnums=(0, 1, 2)))
    assert f"seqjax_{kind}_backward" in step.lower(params, x, carry0).as_text()
    got = step(params, x, carry0)
    want = jax.value_and_grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(params, x, carry0)
    for u, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-5, atol=2e-5)
    run = jax.jit(lambda p, x: native.apply(p, x, initial_carry=carry0))
    text = run.lower(params, x).as_text()
    assert f"seqjax_{kind}_inference" in text and f"seqjax_{kind}_forward" not in text
    want = plain.apply(params, x, initial_carry=carry0)
    for u, w in zip(jax.tree.leaves(run(params, x)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("shape", [(64, 6, 256, 256), (6, 2, 16, 16)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_equals_the_xla_formulation(one_device, kind, shape):
    """At the benchmark's widths (two threads of 128 units) and at exact multiples of the tile, the kernel's outputs
    and gradients equal `fused_lstm`'s / `fused_gru`'s."""
    args = _layer_args(kind, *shape, seed=5)
    native, fused = _layers(kind)
    ours = jax.jit(jax.value_and_grad(_layer_loss(native), argnums=range(6)))(*args)
    theirs = jax.jit(jax.value_and_grad(_layer_loss(fused), argnums=range(6)))(*args)
    for u, w in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_kernel_gradients_of_gradients(one_device, kind):
    """The kernels' custom calls carry the JAX formulation's derivatives, so their backward can be differentiated."""
    args = _layer_args(kind, 5, 4, 3, 18, seed=6)
    w = 3 if kind == "lstm" else 2  # w_ih's position

    def penalty(layer):
        def f(w_ih):
            a = (*args[:w], w_ih, *args[w + 1 :])
            return jnp.sum(jnp.square(jax.grad(_layer_loss(layer), argnums=0)(*a)))

        return f

    native, fused = _layers(kind)
    ours = jax.jit(jax.grad(penalty(native)))(args[w])
    theirs = jax.jit(jax.grad(penalty(fused)))(args[w])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-4)
    # forward over reverse (Hessian-vector products, jax.hessian): the custom calls' JVP is the reference's
    v = jax.random.normal(jax.random.key(12), args[w].shape)

    def hvp(layer):
        grad = lambda w_ih: jax.grad(_layer_loss(layer), argnums=w)(*args[:w], w_ih, *args[w + 1 :])
        return jax.jit(lambda: jax.jvp(grad, (args[w],), (v,))[1])()

    np.testing.assert_allclose(np.asarray(hvp(native)), np.asarray(hvp(fused)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_kernel_with_saturated_gates(one_device, kind):
    """Pre-activations far beyond ±88 (where exp overflows float32) give the XLA formulation's finite values."""
    args = list(_layer_args(kind, 7, 4, 5, 20, seed=13))
    args[0] = args[0] * 500.0
    native, fused = _layers(kind)
    ours = jax.jit(jax.value_and_grad(_layer_loss(native), argnums=range(6)))(*args)
    theirs = jax.jit(jax.value_and_grad(_layer_loss(fused), argnums=range(6)))(*args)
    for u, w in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert np.isfinite(np.asarray(u)).all()
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_fallback_branch_is_the_same_function(one_device, monkeypatch, kind):
    """Lowered for a platform other than CPU, the layer takes the JAX-ops branch of `platform_dependent`; run here by
    making it pick that branch, it gives the same outputs and gradients, with no custom call."""
    args = _layer_args(kind, 7, 5, 4, 20, seed=7)
    step = lambda: jax.jit(jax.value_and_grad(_layer_loss(_layers(kind)[0]), argnums=range(6)))
    native = step()(*args)
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *a, default, **kw: default(*a))
    fallback = step()
    assert "seqjax_" not in fallback.lower(*args).as_text()
    for u, w in zip(jax.tree.leaves(native), jax.tree.leaves(fallback(*args)), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_kernel_under_vmap(one_device, kind):
    pairs = zip(_layer_args(kind, 3, 4, 5, 17, 8), _layer_args(kind, 3, 4, 5, 17, 9), strict=True)
    args = [jnp.stack(pair) for pair in pairs]
    grad = jax.grad(_layer_loss(_layers(kind)[0]), argnums=range(6))
    batched = jax.vmap(grad)(*args)
    for i in range(2):
        single = grad(*(a[i] for a in args))
        for u, w in zip(batched, single, strict=True):
            np.testing.assert_allclose(np.asarray(u[i]), np.asarray(w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_kernel_is_used_only_where_it_applies(monkeypatch, kind):
    """float32 on one CPU device: the kernel; several devices (this process), float64, or lengths: XLA's paths."""
    x = jnp.ones((2, 3, 4))
    make = (lambda **kw: LSTMCell(16, **kw)) if kind == "lstm" else (lambda **kw: GRUCell(16, **kw))
    rnn = RNN(make())
    params = rnn.init(jax.random.key(0), x)
    lowered = lambda **kw: jax.jit(lambda p, x: rnn.apply(p, x, **kw)).lower(params, x).as_text()
    assert "seqjax_" not in lowered()  # 8 devices: a batch-sharded jit would gather the batch for the call
    monkeypatch.setattr(common, "single_device", lambda: True)
    assert (f"seqjax_{kind}" in lowered()) == cpu.recurrent_vectorised()
    assert "seqjax_" not in lowered(seq_lengths=jnp.array([3, 1]))
    with jax.enable_x64(True):  # float64 runs fused_lstm / fused_gru
        rnn64, x64 = RNN(make(param_dtype=jnp.float64)), jnp.ones((2, 3, 4), jnp.float64)
        text = jax.jit(rnn64.apply).lower(rnn64.init(jax.random.key(0), x64), x64).as_text()
        assert "seqjax_" not in text and "f64" in text


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_layers_with_the_kernels_match_torch(one_device, kind):
    """Two bidirectional layers loaded from torch.nn.LSTM / GRU's weights: outputs, final states, input gradients."""
    torch = pytest.importorskip("torch")
    from seqjax.interop.torch import load_gru, load_lstm
    from seqjax.nn import GRU, LSTM

    torch.manual_seed(0)
    b, t, f, h = 5, 7, 6, 20
    module = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(
        f, h, num_layers=2, bidirectional=True, batch_first=True
    )
    x = np.random.default_rng(10).normal(size=(b, t, f)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    out, state = module(xt)
    state = list(state) if kind == "lstm" else [state]
    (out.square().sum() + sum(s.sin().sum() * (i + 1) for i, s in enumerate(state))).backward()
    layer = (LSTM if kind == "lstm" else GRU)(h, num_layers=2, bidirectional=True)
    variables = (load_lstm if kind == "lstm" else load_gru)(module.state_dict(), num_layers=2, bidirectional=True)

    def loss(x):
        ys, st = layer.apply(variables, x)
        st = list(st) if kind == "lstm" else [st]
        return jnp.sum(ys * ys) + sum(jnp.sum(jnp.sin(s)) * (i + 1) for i, s in enumerate(st)), (ys, st)

    step = jax.jit(jax.grad(loss, has_aux=True))
    assert f"seqjax_{kind}_backward" in step.lower(jnp.asarray(x)).as_text()
    dx, (ys, st) = step(jnp.asarray(x))
    for ours, theirs in [(ys, out), *zip(st, state, strict=True), (dx, xt.grad)]:
        np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=1e-5, atol=1e-5)
