"""The kernel registry: every attention kernel by name against `reference` (values and gradients), and what "auto"
lowers to on each platform (CPU lowered here; CUDA and TPU exported with `jax.export`, which needs no accelerator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import kernels
from seqjax.kernels import common, cpu, registry
from seqjax.kernels import reference as reference_kernel
from seqjax.nn import MultiHeadAttention, causal_mask, padding_mask, scaled_dot_product_attention

# "cudnn" needs an NVIDIA GPU (elsewhere it is an error, tested in tests/nn/test_attention.py).
NAMES = [n for n in kernels.NAMES if n != "cudnn" or jax.default_backend() == "gpu"]


@pytest.fixture(autouse=True)
def _one_device(monkeypatch):
    """The suite runs with 8 CPU devices; kernels are chosen here as in a one-device process (the C++ one where
    built)."""
    monkeypatch.setattr(common, "single_device", lambda: True)


def _case(b, t, n, h, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.float32) for kk in ks)
    lengths = np.array([t, t // 3] + [t] * (b - 2))[:b]
    mask = causal_mask(t) & padding_mask(jnp.arange(t)[None] < lengths[:, None])  # a fully masked row in b=1
    return q, k, v, mask


@pytest.mark.slow_beyond(2)
@pytest.mark.parametrize("t", [6, 384], ids=["one-block", "blocks"])  # 2*2*384*384 > 2**19: the blocks run
@pytest.mark.parametrize("name", NAMES)
def test_every_kernel_gives_the_reference(name, t):
    q, k, v, mask = _case(2, t, 2, 8)
    loss = lambda impl: jax.jit(
        jax.value_and_grad(
            lambda q, k, v: jnp.sum(jnp.sin(scaled_dot_product_attention(q, k, v, mask, implementation=impl))),
            (0, 1, 2),
        )
    )
    (got, got_grads), (want, want_grads) = loss(name)(q, k, v), loss("reference")(q, k, v)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for u, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)


@pytest.mark.slow_beyond(9)
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["multi-query", "grouped"])
@pytest.mark.parametrize("t", [6, 384], ids=["one-block", "blocks"])
@pytest.mark.parametrize("name", NAMES)
def test_every_kernel_takes_grouped_heads(name, t, kv_heads):
    """Key/value with K < N heads (grouped-query attention) give what the reference gives on k, v repeated to N
    heads (query head n reads key/value head n // (N/K), as jnp.repeat lays them out), values and gradients."""
    q, k, v, mask = _case(2, t, 4, 8)
    k, v = k[..., :kv_heads, :], v[..., :kv_heads, :]
    repeat = lambda x: jnp.repeat(x, 4 // kv_heads, axis=-2)

    def loss(impl, expand):
        f = lambda q, k, v: jnp.sum(jnp.sin(scaled_dot_product_attention(q, *expand(k, v), mask, implementation=impl)))
        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)

    (got, got_grads), (want, want_grads) = loss(name, lambda *kv: kv), loss("reference", lambda *kv: map(repeat, kv))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for u, w in zip(got_grads, want_grads, strict=True):
        assert u.shape == w.shape
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_blocked_kernel_on_grouped_heads_in_small_blocks():
    """The blocked kernel forced into query blocks (small `block_elements`) on grouped heads."""
    q, k, v, mask = _case(2, 40, 4, 8)
    k, v = k[..., :2, :], v[..., :2, :]
    want = scaled_dot_product_attention(q, k, v, mask, implementation="reference")
    f = lambda q, k, v: scaled_dot_product_attention(q, k, v, mask, implementation="blocked", block_elements=256)
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(want), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1, 2))(q, k, v)
    w = jax.grad(
        lambda *a: jnp.sum(scaled_dot_product_attention(*a, mask, implementation="reference") ** 2), (0, 1, 2)
    )(q, k, v)
    for u, ww in zip(g, w, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(ww), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["reference", "jax"])
def test_grouped_heads_are_not_repeated_in_memory(name):
    """The "reference" kernel (a grouped einsum) and "jax" (jax.nn groups natively; GPU and TPU run it under "auto")
    never build k or v with N heads, forward or backward: no value of the program has shape [B, Tk, N, H] or
    [B, N, Tk, H]."""
    q, k, v = jnp.ones((2, 3, 4, 8)), jnp.ones((2, 5, 1, 8)), jnp.ones((2, 5, 1, 8))
    f = lambda *a: jnp.sum(scaled_dot_product_attention(*a, implementation=name))
    shapes, todo = set(), [jax.make_jaxpr(jax.grad(f, (0, 1, 2)))(q, k, v).jaxpr]
    while todo:
        for eqn in todo.pop().eqns:
            shapes |= {tuple(getattr(x.aval, "shape", ())) for x in eqn.outvars}
            todo += [getattr(p, "jaxpr", p) for p in eqn.params.values() if hasattr(getattr(p, "jaxpr", p), "eqns")]
    assert (2, 1, 5, 8) in shapes or (2, 5, 1, 8) in shapes
    assert not {(2, 5, 4, 8), (2, 4, 5, 8)} & shapes


def test_heads_that_do_not_group_name_the_shapes():
    q, k, v, _ = _case(1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"multiple of the key/value heads K.*\(1, 4, 3, 8\)"):
        scaled_dot_product_attention(q, k[..., :3, :], v[..., :3, :], implementation="reference")
    with pytest.raises(ValueError, match=r"equal B\.\.\., Tk and K"):
        scaled_dot_product_attention(q, k[..., :2, :], v, implementation="reference")


def test_names_and_aliases():
    assert set(kernels.ATTENTION) == {"auto", "reference", "blocked", "jax", "cudnn", "cpu"}
    assert kernels.attention_kernel("xla") is kernels.ATTENTION["auto"]
    assert set(kernels.RECURRENT) == {"lstm", "gru", "fused_lstm", "fused_gru", "cpu_lstm", "cpu_gru"}
    with pytest.raises(ValueError, match="implementation must be one of"):
        kernels.attention_kernel("flash")


@pytest.mark.slow
def test_attention_fn_after_flax_convention():
    """`MultiHeadAttention(attention_fn=...)` takes any callable with scaled_dot_product_attention's signature; a
    registered kernel gives what its name gives."""
    x = jax.random.normal(jax.random.key(1), (2, 384, 16))
    calls = []

    def mine(query, key, value, mask=None, **kwargs):
        calls.append(query.shape)
        return reference_kernel.attention(query, key, value, mask, **kwargs)

    outs = []
    for kw in (dict(attention_fn=mine), dict(attention_fn=kernels.ATTENTION["blocked"]), dict(implementation="auto")):
        m = MultiHeadAttention(num_heads=2, **kw)
        params = m.init(jax.random.key(2), x)
        outs.append(m.apply(params, x, mask=causal_mask(384)))
    assert calls and calls[-1] == (2, 384, 2, 8)
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs[0]), rtol=2e-5, atol=2e-5)


def _mha_step(implementation="auto"):
    m = MultiHeadAttention(num_heads=2, implementation=implementation)
    x = jnp.ones((2, 384, 16))
    params = m.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(m.apply(p, x, mask=causal_mask(384)) ** 2)))
    return grad, params, x


def _sdpa_step(implementation="auto"):
    q, k, v, mask = _case(2, 384, 2, 8)
    grad = jax.jit(
        jax.grad(lambda q: jnp.sum(scaled_dot_product_attention(q, k, v, mask, implementation=implementation) ** 2))
    )
    return grad, (q,)


def test_auto_on_cpu():
    """CPU: the C++ kernel for MultiHeadAttention's self-attention where built, else the blocked kernel (a loop over
    blocks); the blocked kernel for scaled_dot_product_attention on q, k, v."""
    grad, params, x = _mha_step()
    text = grad.lower(params, x).as_text()
    assert ("seqjax_attention_backward" in text) == cpu.available()
    assert "stablehlo.while" in _mha_step("blocked")[0].lower(params, x).as_text()
    sdpa, args = _sdpa_step()
    text = sdpa.lower(*args).as_text()
    assert "stablehlo.while" in text and "seqjax_" not in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_exported_for_accelerators(platform):
    """Exported for CUDA or TPU (traced on this CPU), "auto" holds no CPU custom call and no blocked loop: it is
    jax.nn.dot_product_attention (XLA's formulation here; cuDNN's is chosen only when traced on an NVIDIA GPU)."""
    grad, params, x = _mha_step()
    sdpa, args = _sdpa_step()
    for f, a in ((grad, (params, x)), (sdpa, args)):
        text = jax.export.export(f, platforms=(platform,))(*a).mlir_module()
        assert "seqjax_" not in text and "stablehlo.while" not in text


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_layers_exported_for_accelerators(kind):
    """The LSTM and GRU layers chosen on this CPU (the C++ kernels where built) export for CUDA and TPU with no CPU
    custom call: the kernels' `platform_dependent` takes their JAX-ops branch there."""
    from seqjax.nn import GRU, LSTM

    layer = (LSTM if kind == "lstm" else GRU)(16)
    x = jnp.ones((2, 5, 4))
    params = layer.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[0] ** 2)))
    assert (f"seqjax_{kind}_backward" in grad.lower(params, x).as_text()) == cpu.recurrent_vectorised()
    for platform in ("cuda", "tpu"):
        assert "seqjax_" not in jax.export.export(grad, platforms=(platform,))(params, x).mlir_module()


def test_registry_imports_nothing_from_nn():
    import ast
    import pathlib

    root = pathlib.Path(registry.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("seqjax.nn", "seqjax.models")), path


def test_where_cudnn_applies(monkeypatch):
    """The GPU branch of "auto" takes cuDNN for float16 / bfloat16 with a head dim that is a multiple of 8 up to 128
    and no bias, on an NVIDIA GPU only (checked here with the GPU pretended)."""
    from seqjax.kernels import jax_nn

    q = jnp.ones((2, 16, 4, 64), jnp.bfloat16)
    assert not jax_nn.cudnn_applies(q, q, q, None) or jax.default_backend() == "gpu"
    monkeypatch.setattr(jax_nn, "cudnn_available", lambda: True)
    assert jax_nn.cudnn_applies(q, q, q, None)
    assert not jax_nn.cudnn_applies(q, q, q, jnp.zeros((1, 4, 16, 16)))
    assert not jax_nn.cudnn_applies(q.astype(jnp.float32), q, q, None)
    assert not jax_nn.cudnn_applies(q[..., :12], q[..., :12], q[..., :12], None)
    assert not jax_nn.applies(q, q, q, 0.1, False) and not jax_nn.applies(q, q, q, 0.0, True)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_under_strict_promotion(name):
    """bfloat16 inputs under the suite's strict dtype promotion (jax.nn promotes inside itself: the kernel allows
    it there); the result stays bfloat16 and near the float32 reference."""
    q, k, v, mask = _case(2, 8, 2, 8)
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    out = scaled_dot_product_attention(*half, mask, implementation=name)
    assert out.dtype == jnp.bfloat16
    want = scaled_dot_product_attention(q, k, v, mask, implementation="reference")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), atol=5e-2)
