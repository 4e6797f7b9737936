"""seqjax attention against PyTorch: converted weights give torch's outputs and gradients (float32, CPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.interop.torch import linear_to_kernel, load_multihead_attention
from seqjax.nn import MultiHeadAttention, causal_mask, scaled_dot_product_attention

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {"rtol": 1e-5, "atol": 1e-5}
IMPLEMENTATIONS = ("xla", "reference", "jax")


def _numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _torch_mha(embed_dim, num_heads, *, kdim=None, vdim=None, bias=True, add_bias_kv=False, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(
        embed_dim, num_heads, bias=bias, kdim=kdim, vdim=vdim, add_bias_kv=add_bias_kv, batch_first=True
    )
    # torch initialises the biases to zero; random ones check their mapping too.
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


def _assert_trees_close(ours, theirs, **tol):
    flat_ours, tree_ours = jax.tree_util.tree_flatten_with_path(ours)
    flat_theirs, tree_theirs = jax.tree_util.tree_flatten_with_path(theirs)
    assert tree_ours == tree_theirs
    for (path, a), (_, b) in zip(flat_ours, flat_theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path), **tol)


# ----------------------------------------------------------------------------------------------------------------
# MultiHeadAttention with converted weights
# ----------------------------------------------------------------------------------------------------------------

MHA_CASES = ("self", "cross", "causal", "padding", "no_bias", "unfused")


def _mha_case(case: str):
    """(torch module, num_heads, torch kwargs, xq, xkv or None, our mask or None, use_bias, fuse_qkv)."""
    b, tq, tk, e, n = 2, 5, 7, 8, 2
    rs = np.random.RandomState(0)
    kv_dim = 6 if case == "cross" else None
    m = _torch_mha(e, n, kdim=kv_dim, vdim=kv_dim, bias=case != "no_bias")
    xq = rs.randn(b, tq, e).astype(np.float32)
    xkv = rs.randn(b, tk, kv_dim).astype(np.float32) if case == "cross" else None
    torch_kwargs, mask = {}, None
    if case == "causal":
        attn_mask = np.triu(np.ones((tq, tq), bool), 1)  # torch: True = may NOT attend
        mask = causal_mask(tq)
        np.testing.assert_array_equal(~attn_mask, mask[0, 0])
        torch_kwargs["attn_mask"] = torch.from_numpy(attn_mask)
    if case in ("padding", "cross"):
        t = tq if xkv is None else tk
        lengths = np.array([t, 3])
        key_padding_mask = np.arange(t)[None, :] >= lengths[:, None]  # torch: True = padding
        mask = ~key_padding_mask[:, None, None, :]
        torch_kwargs["key_padding_mask"] = torch.from_numpy(key_padding_mask)
    return m, n, torch_kwargs, xq, xkv, mask, case != "no_bias", case != "unfused"


def _torch_forward(m, xq, xkv, torch_kwargs, requires_grad=False):
    q = torch.from_numpy(xq).requires_grad_(requires_grad)
    kv = q if xkv is None else torch.from_numpy(xkv).requires_grad_(requires_grad)
    out, _ = m(q, kv, kv, need_weights=False, **torch_kwargs)
    return out, q, kv


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_matches_torch(case, implementation):
    m, n, torch_kwargs, xq, xkv, mask, use_bias, fuse_qkv = _mha_case(case)
    variables = load_multihead_attention(_numpy_state(m), num_heads=n)
    layer = MultiHeadAttention(num_heads=n, use_bias=use_bias, implementation=implementation, fuse_qkv=fuse_qkv)
    ours = layer.apply(variables, xq, xkv, mask=mask)
    with torch.no_grad():
        theirs, _, _ = _torch_forward(m, xq, xkv, torch_kwargs)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), **TOL)


def test_converted_variables_have_the_layer_structure():
    m, n, _, xq, xkv, _, _, _ = _mha_case("cross")
    variables = load_multihead_attention(_numpy_state(m), num_heads=n)
    init = MultiHeadAttention(num_heads=n).init(jax.random.key(0), xq, xkv)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(variables) == shapes(jax.tree.map(np.asarray, init))


@pytest.mark.slow_beyond(2)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ("causal", "cross", "no_bias"))
def test_multihead_attention_gradients_match_torch(case, implementation):
    m, n, torch_kwargs, xq, xkv, mask, use_bias, fuse_qkv = _mha_case(case)
    variables = load_multihead_attention(_numpy_state(m), num_heads=n)
    layer = MultiHeadAttention(num_heads=n, use_bias=use_bias, implementation=implementation, fuse_qkv=fuse_qkv)
    cot = np.random.RandomState(1).randn(*xq.shape).astype(np.float32)

    def loss(params, xq, xkv):
        return jnp.sum(layer.apply({"params": params}, xq, xkv, mask=mask) * cot)

    argnums = (0, 1) if xkv is None else (0, 1, 2)
    grads = jax.grad(loss, argnums=argnums)(variables["params"], xq, xkv)

    out, q, kv = _torch_forward(m, xq, xkv, torch_kwargs, requires_grad=True)
    (out * torch.from_numpy(cot)).sum().backward()
    # The converter is linear (transposes and reshapes), so it maps torch's parameter gradients to ours.
    torch_param_grads = load_multihead_attention({k: p.grad.numpy() for k, p in m.named_parameters()}, num_heads=n)
    _assert_trees_close(grads[0], torch_param_grads["params"], **TOL)
    np.testing.assert_allclose(np.asarray(grads[1]), q.grad.numpy(), **TOL)
    if xkv is not None:
        np.testing.assert_allclose(np.asarray(grads[2]), kv.grad.numpy(), **TOL)


def test_load_with_prefix_from_a_bigger_model():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=4, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    state = _numpy_state(encoder)
    variables = load_multihead_attention(state, num_heads=4, prefix="layers.1.self_attn.")
    x = np.random.RandomState(0).randn(2, 6, 8).astype(np.float32)
    ours = MultiHeadAttention(num_heads=4).apply(variables, x)
    with torch.no_grad():
        attn = encoder.layers[1].self_attn
        theirs = attn(*(torch.from_numpy(x),) * 3, need_weights=False)[0].numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, **TOL)
    # Tensors work as well as numpy arrays.
    from_tensors = load_multihead_attention(encoder.state_dict(), num_heads=4, prefix="layers.1.self_attn.")
    _assert_trees_close(from_tensors, variables, rtol=0, atol=0)


def test_converted_arrays_do_not_alias_torch_storage():
    m = _torch_mha(8, 2)
    variables = load_multihead_attention(m.state_dict(), num_heads=2)
    before = variables["params"]["out"]["bias"].copy()
    with torch.no_grad():
        m.out_proj.bias.add_(1.0)
    np.testing.assert_array_equal(variables["params"]["out"]["bias"], before)


def test_linear_to_kernel_matches_torch_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 8)
    x = np.random.RandomState(0).randn(3, 6).astype(np.float32)
    kernel = linear_to_kernel(lin.weight.detach().numpy(), out_shape=(2, 4))
    assert kernel.shape == (6, 2, 4)
    ours = np.einsum("bf,fnh->bnh", x, kernel).reshape(3, 8) + lin.bias.detach().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(ours, lin(torch.from_numpy(x)).numpy(), **TOL)
    assert linear_to_kernel(lin.weight.detach().numpy(), in_shape=(3, 2)).shape == (3, 2, 8)
    with pytest.raises(ValueError, match=re.escape("(8, 6)")):
        linear_to_kernel(lin.weight.detach().numpy(), out_shape=(3, 3))


def test_module_does_not_import_torch():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, seqjax.interop.torch; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)


# ----------------------------------------------------------------------------------------------------------------
# Converter errors
# ----------------------------------------------------------------------------------------------------------------


def _state(**mha_kwargs):
    return _numpy_state(_torch_mha(8, 2, **mha_kwargs))


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("state", "kwargs", "message"),
    [
        (_without(_state(), "out_proj.weight"), {}, "missing key out_proj.weight"),
        (_without(_state(), "in_proj_weight"), {}, "missing in_proj_weight"),
        (_without(_state(kdim=6, vdim=6), "k_proj_weight"), {}, "missing in_proj_weight"),
        ({**_state(), "in_proj_weight": np.zeros((23, 8), np.float32)}, {}, "in_proj_weight has shape (23, 8)"),
        ({**_state(), "out_proj.weight": np.zeros((8, 6), np.float32)}, {}, "out_proj.weight has shape (8, 6)"),
        ({**_state(), "in_proj_bias": np.zeros(8, np.float32)}, {}, "in_proj_bias has shape (8,)"),
        ({**_state(), "q_proj_weight": np.zeros((8, 8), np.float32)}, {}, "q_proj_weight"),
        ({**_state(), "extra.weight": np.zeros(3)}, {}, "unexpected keys ['extra.weight']"),
        (_without(_state(), "out_proj.bias"), {}, "in_proj_bias is present without out_proj.bias"),
        (_state(), {"num_heads": 3}, "num_heads (3) must be a positive divisor of embed_dim E = 8"),
        (_state(), {"prefix": "encoder."}, "no key of the state_dict starts with prefix 'encoder.'"),
        (
            {f"enc.{k}": v for k, v in _without(_state(), "in_proj_bias").items()},
            {"prefix": "enc."},
            "enc.out_proj.bias is present without enc.in_proj_bias",
        ),
    ],
)
def test_bad_state_dict_raises_value_error_naming_it(state, kwargs, message):
    kwargs = {"num_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        load_multihead_attention(state, **kwargs)


@pytest.mark.parametrize(
    ("state", "kwargs", "message"),
    [
        (_state(add_bias_kv=True), {}, "bias_k"),
        (_state(), {"add_zero_attn": True}, "add_zero_attn"),
        (_state(kdim=6, vdim=4), {}, "kdim != vdim"),
    ],
)
def test_unsupported_torch_options_raise_not_implemented(state, kwargs, message):
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        load_multihead_attention(state, num_heads=2, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------------------------

SDPA_CASES = ("plain", "mask", "padding", "causal", "scale", "cross", "value_dim", "batch_dims", "blocks")


def _sdpa_case(case: str):
    """Our (q, k, v) in [B..., T, N, H], our kwargs, torch kwargs (masks in [B..., N, Tq, Tk], same as ours)."""
    batch = (2, 3) if case == "batch_dims" else (2,)
    tq = 10 if case == "blocks" else 5
    tk = 7 if case in ("cross", "mask", "blocks") else tq
    n, h, hv = 2, 4, (3 if case == "value_dim" else 4)
    rs = np.random.RandomState(0)
    q = rs.randn(*batch, tq, n, h).astype(np.float32)
    k = rs.randn(*batch, tk, n, h).astype(np.float32)
    v = rs.randn(*batch, tk, n, hv).astype(np.float32)
    ours, theirs = {}, {}
    if case in ("mask", "blocks"):
        mask = rs.rand(*batch, n, tq, tk) < 0.6
        mask[..., 0] = True  # no fully masked rows: torch returns NaN there, we return zeros
        ours["mask"] = mask
        theirs["attn_mask"] = torch.from_numpy(mask)
    if case == "batch_dims":  # a mask whose batch dims broadcast only partly: [2, 1, 1, Tq, Tk]
        mask = rs.rand(batch[0], 1, 1, tq, tk) < 0.6
        mask[..., 0] = True
        ours["mask"] = mask
        theirs["attn_mask"] = torch.from_numpy(mask)
    if case == "blocks":  # several batch and query blocks, and query padding, in the "xla" kernel
        ours["block_elements"] = 16
    if case == "padding":
        mask = np.arange(tk)[None, None, None, :] < np.array([tk, 2])[:, None, None, None]  # [B, 1, 1, Tk]
        ours["mask"] = mask
        theirs["attn_mask"] = torch.from_numpy(mask)
    if case == "causal":
        ours["mask"] = causal_mask(tq)
        theirs["is_causal"] = True
    if case == "scale":
        ours["scale"] = theirs["scale"] = 0.3
    return (q, k, v), ours, theirs


def _to_torch_layout(x):
    """[B..., T, N, H] → [B..., N, T, H]."""
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, -3, -2)))


def _from_torch_layout(x):
    return np.swapaxes(x.detach().numpy(), -3, -2)


def _our_sdpa(case_kwargs, implementation):
    kwargs = dict(case_kwargs)
    if implementation != "xla":
        kwargs.pop("block_elements", None)
    return lambda q, k, v: scaled_dot_product_attention(q, k, v, implementation=implementation, **kwargs)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", SDPA_CASES)
def test_scaled_dot_product_attention_matches_torch(case, implementation):
    (q, k, v), ours_kwargs, torch_kwargs = _sdpa_case(case)
    ours = _our_sdpa(ours_kwargs, implementation)(q, k, v)
    theirs = F.scaled_dot_product_attention(*map(_to_torch_layout, (q, k, v)), **torch_kwargs)
    assert ours.shape == q.shape[:-1] + v.shape[-1:]
    np.testing.assert_allclose(np.asarray(ours), _from_torch_layout(theirs), **TOL)


@pytest.mark.slow_beyond(18)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ("plain", "mask", "causal", "cross", "value_dim", "batch_dims", "blocks"))
def test_scaled_dot_product_attention_gradients_match_torch(case, implementation):
    (q, k, v), ours_kwargs, torch_kwargs = _sdpa_case(case)
    cot = np.random.RandomState(1).randn(*q.shape[:-1], v.shape[-1]).astype(np.float32)
    sdpa = _our_sdpa(ours_kwargs, implementation)
    grads = jax.grad(lambda q, k, v: jnp.sum(sdpa(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (_to_torch_layout(x).requires_grad_(True) for x in (q, k, v))
    out = F.scaled_dot_product_attention(tq, tk, tv, **torch_kwargs)
    (out * _to_torch_layout(cot)).sum().backward()
    for name, ours, theirs in zip("qkv", grads, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(np.asarray(ours), _from_torch_layout(theirs.grad), err_msg=f"d{name}", **TOL)
