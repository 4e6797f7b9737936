"""MultiHeadAttention with rotary positions (`rope_base`) and grouped-query attention (`num_kv_heads`) against two
independent references: a float64 numpy implementation (runs everywhere) and `transformers`' LlamaAttention with
mapped weights (where transformers is installed); cached decoding against the full pass; the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from seqjax.kernels import common
from seqjax.nn import MultiHeadAttention, causal_mask

N, F, H = 4, 32, 8  # query heads, features, head dim


@pytest.fixture(autouse=True)
def _one_device_policy(monkeypatch):
    """The suite runs with 8 CPU devices; the layer runs here as in a one-device process (the C++ kernel where
    built)."""
    monkeypatch.setattr(common, "single_device", lambda: True)


def np_rotary(x, positions, base, interleaved=False):
    """x [B, T, heads, H] rotated at integer positions [B, T]: channel j pairs with j + H/2 (rotate-half, Llama);
    `interleaved` pairs 2i with 2i+1 instead (RoFormer, GPT-J), only to show that the tests tell them apart."""
    h = x.shape[-1]
    angles = positions[..., None, None] * base ** (-np.arange(0, h, 2) / h)  # [B, T, 1, H/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_grouped_rotary_attention(params, x, positions, base, interleaved=False):
    """Causal self-attention in float64 numpy: x [B, T, F], query kernel [F, N, H], key/value kernels [F, K, H];
    query head n reads key/value head n // (N/K)."""
    p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params.items()}
    x = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btf,fnh->btnh", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
    q, k = (np_rotary(a, positions, base, interleaved) for a in (q, k))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    t = x.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknh->bqnh", w, v)
    return np.einsum("bqnh,nhd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def _inputs(b=2, t=7, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, F))
    positions = np.arange(t)[None] + np.array([0, 5])[:b, None]  # the second sequence starts at position 5
    return x, positions


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("fuse_qkv", [True, False])
@pytest.mark.parametrize("impl", ["auto", "reference", "jax"])
def test_matches_numpy(kv_heads, fuse_qkv, impl):
    x, positions = _inputs()
    layer = MultiHeadAttention(N, num_kv_heads=kv_heads, rope_base=500.0, fuse_qkv=fuse_qkv, implementation=impl)
    params = layer.init(jax.random.key(1), x)["params"]
    assert params["query"]["kernel"].shape == (F, N, H) and params["out"]["kernel"].shape == (N, H, F)
    assert params["key"]["kernel"].shape == params["value"]["kernel"].shape == (F, kv_heads, H)
    assert params["key"]["bias"].shape == (kv_heads, H)
    got = layer.apply({"params": params}, x, mask=causal_mask(7), positions=positions)
    want = np_grouped_rotary_attention(params, x, positions, 500.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # The comparison tells the conventions apart: the interleaved pairing is far off.
    assert np.abs(np_grouped_rotary_attention(params, x, positions, 500.0, interleaved=True) - want).max() > 1e-2


@pytest.mark.slow
def test_default_positions_count_from_zero_and_fast_path_agrees():
    """Without `positions` the tokens sit at 0..T-1. Above one block (the blocked kernel's d(qkv) variant or the C++
    kernel on the rotated fused projection) the result equals the reference kernel's."""
    x = jax.random.normal(jax.random.key(3), (2, 384, F))
    positions = np.broadcast_to(np.arange(384), (2, 384))
    layer = MultiHeadAttention(N, rope_base=10000.0)
    params = layer.init(jax.random.key(1), x)["params"]
    got = layer.apply({"params": params}, x, mask=causal_mask(384))
    want = np_grouped_rotary_attention(params, x, positions, 10000.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    reference = MultiHeadAttention(N, rope_base=10000.0, implementation="reference")
    loss = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, mask=causal_mask(384)) ** 2))(params)
    for u, w in zip(jax.tree.leaves(loss(layer)), jax.tree.leaves(loss(reference)), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_matches_transformers_llama_attention(kv_heads):
    """Llama's attention (rotate-half RoPE, grouped heads by repeat_kv, biases on) with its weights mapped into
    ours: torch's Linear weight [out, in] is our kernel transposed, split into heads."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    config = transformers.LlamaConfig(
        hidden_size=F, num_attention_heads=N, num_key_value_heads=kv_heads, head_dim=H, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    llama = modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    x, positions = _inputs()
    xt, pt = torch.tensor(np.asarray(x)), torch.tensor(positions)
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(xt, pt)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = llama(xt, position_embeddings=(cos, sin), attention_mask=mask)[0].numpy()

    sd = {k: v.detach().numpy() for k, v in llama.state_dict().items()}
    heads = {"query": ("q_proj", N), "key": ("k_proj", kv_heads), "value": ("v_proj", kv_heads)}
    params = {
        ours: {"kernel": sd[f"{name}.weight"].T.reshape(F, n, H), "bias": sd[f"{name}.bias"].reshape(n, H)}
        for ours, (name, n) in heads.items()
    }
    params["out"] = {"kernel": sd["o_proj.weight"].T.reshape(N, H, F), "bias": sd["o_proj.bias"]}
    layer = MultiHeadAttention(N, num_kv_heads=kv_heads, rope_base=500.0)
    got = layer.apply({"params": params}, x, mask=causal_mask(7), positions=positions)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("prefill", [0, 3])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_cached_decoding_equals_the_full_pass(kv_heads, prefill):
    """The cache holds K heads of rotated keys; decoding one token at a time (after a prompt prefilled in one call)
    gives the full causal pass, the rotary positions coming from the cache index."""
    x, _ = _inputs(t=7)
    full_model = MultiHeadAttention(N, num_kv_heads=kv_heads, rope_base=10000.0)
    params = full_model.init(jax.random.key(9), x)["params"]
    full = full_model.apply({"params": params}, x, mask=causal_mask(7))
    dec = MultiHeadAttention(N, num_kv_heads=kv_heads, rope_base=10000.0, decode=True)
    cache = dec.init(jax.random.key(9), jnp.zeros((2, 7, F)))["cache"]
    assert cache["cached_key"].shape == cache["cached_value"].shape == (2, 7, kv_heads, H)
    outs = []
    if prefill:
        y, upd = dec.apply({"params": params, "cache": cache}, x[:, :prefill], mutable=["cache"])
        outs, cache = [y], upd["cache"]
    step = jax.jit(lambda cache, xt: dec.apply({"params": params, "cache": cache}, xt, mutable=["cache"]))
    for t in range(prefill, 7):
        y, upd = step(cache, x[:, t : t + 1])
        outs.append(y)
        cache = upd["cache"]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_float64_gradients(x64):
    """Gradients through the rotation and the grouped heads (parameters and inputs) by finite differences."""
    x = np.random.default_rng(18).normal(size=(2, 5, 16))
    m = MultiHeadAttention(N, num_kv_heads=2, rope_base=100.0, param_dtype=jnp.float64)
    params = m.init(jax.random.key(8), x)
    check_grads(lambda p, x: m.apply(p, x, mask=causal_mask(5)), (params, x), order=1, modes=["rev"])


def test_errors_name_the_settings(rng):
    x = jnp.zeros((2, 4, F))
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        MultiHeadAttention(N, num_kv_heads=3).init(rng, x)
    with pytest.raises(ValueError, match=r"num_kv_heads \(0\)"):
        MultiHeadAttention(N, num_kv_heads=0).init(rng, x)
    with pytest.raises(ValueError, match=r"rope_base > 0 \(got -1.0\)"):
        MultiHeadAttention(N, rope_base=-1.0).init(rng, x)
    with pytest.raises(ValueError, match=r"even head dim \(qkv_features / num_heads = 3\)"):
        MultiHeadAttention(N, qkv_features=12, rope_base=10000.0).init(rng, x)
    with pytest.raises(ValueError, match="self-attention"):
        MultiHeadAttention(N, rope_base=10000.0).init(rng, x, x)
    with pytest.raises(ValueError, match="need rope_base"):
        MultiHeadAttention(N).init(rng, x, positions=jnp.arange(4))
    with pytest.raises(ValueError, match=r"positions of shape \(5,\)"):
        MultiHeadAttention(N, rope_base=10000.0).init(rng, x, positions=jnp.arange(5))
