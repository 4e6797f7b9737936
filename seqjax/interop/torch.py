"""Converters from PyTorch `state_dict`s to seqjax Flax variables, in numpy only: this module never imports torch.

Glossary: E embed dim (torch's `embed_dim`, our qkv and out width), N heads, H = E // N head dim, F query input
width (= E in torch), F' key/value input width (torch's `kdim` = `vdim`).

Inputs are anything `np.asarray` accepts (numpy arrays, CPU torch tensors from `state_dict()`, which are detached);
the values are copied, so the returned variables never alias torch's storage. Outputs are numpy arrays in the
input dtype, ready for `module.apply(variables, ...)`.

PyTorch's linear layers store `weight [out, in]` and compute `y = x Wᵀ + b`; Flax kernels are `[in..., out...]` and
compute `y = x K + b`. So every kernel is Wᵀ with its axes split into the layer's structure (`linear_to_kernel`).

`torch.nn.MultiheadAttention` → `seqjax.nn.MultiHeadAttention(num_heads=N, use_bias=<torch's bias>)`:

    torch key                      shape            seqjax param                 mapping
    in_proj_weight[0:E]   (W_q)    [E, E]           query/kernel [F, N, H]       W_qᵀ, output axis split (N, H)
    in_proj_weight[E:2E]  (W_k)    [E, E]           key/kernel   [F', N, H]      W_kᵀ, likewise
    in_proj_weight[2E:3E] (W_v)    [E, E]           value/kernel [F', N, H]      W_vᵀ, likewise
    q_proj_weight, k_proj_weight,  [E, F], [E, F'],  (instead of in_proj_weight when kdim / vdim differ from E)
      v_proj_weight                [E, F']
    in_proj_bias                   [3E]             query/key/value bias [N, H]  thirds, split (N, H)
    out_proj.weight   (W_o)        [E, E]           out/kernel [N, H, E]         W_oᵀ, input axis split (N, H)
    out_proj.bias                  [E]              out/bias [E]

Torch reshapes the projected `[.., E]` into heads as `[.., N, H]` (head n = columns n*H:(n+1)*H), which is the
row-major split used here, and both scale the logits by 1/sqrt(H), so outputs agree to float rounding.

Masks have opposite conventions: torch's boolean `attn_mask` [Tq, Tk] and `key_padding_mask` [B, Tk] are True where
attention is *not* allowed; ours is True where it is. Use `mask = ~attn_mask[None, None]` and
`mask = ~key_padding_mask[:, None, None, :]` (combine with `seqjax.nn.combine_masks`). Note that
`torch.nn.functional.scaled_dot_product_attention` uses our convention (True = may attend) for boolean masks.

`torch.nn.LSTM` / `GRU` / `RNN` → `seqjax.nn.LSTM` / `GRU` / `SimpleRNN` (`load_lstm`, `load_gru`, `load_rnn`): the
gate order is the same (LSTM i, f, g, o; GRU r, z, n), so `weight_ih_l{k}[_reverse]` [G*H, in] becomes
`l{k}[_reverse]/cell/input/kernel` [in, G*H] (its transpose), `weight_hh_...` becomes `.../hidden/kernel`, and
`bias_ih_...` / `bias_hh_...` map unchanged to the two biases. Torch's LSTM state is (h, c); seqjax's LSTM returns
(h_n, c_n) in the same order, while a single `LSTMCell` carries (c, h).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["linear_to_kernel", "load_gru", "load_lstm", "load_multihead_attention", "load_rnn"]

_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")
_MHA_BIASES = ("in_proj_bias", "out_proj.bias")


def linear_to_kernel(
    weight: Any, in_shape: Sequence[int] | None = None, out_shape: Sequence[int] | None = None
) -> np.ndarray:
    """PyTorch linear weight `[out, in]` → Flax kernel `[*in_shape, *out_shape]`.

    The kernel is Wᵀ; `in_shape` / `out_shape` split its input / output axis row-major (default: unsplit), e.g.
    `out_shape=(N, H)` for a projection into heads, `in_shape=(N, H)` for the projection out of them.
    """
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"linear_to_kernel expects a weight [out, in], got shape {weight.shape}")
    out_dim, in_dim = weight.shape
    in_shape = (in_dim,) if in_shape is None else tuple(in_shape)
    out_shape = (out_dim,) if out_shape is None else tuple(out_shape)
    if int(np.prod(in_shape)) != in_dim or int(np.prod(out_shape)) != out_dim:
        raise ValueError(
            f"linear_to_kernel: weight of shape {weight.shape} ([out, in]) cannot be split into in_shape {in_shape} "
            f"and out_shape {out_shape}"
        )
    return np.ascontiguousarray(weight.T.reshape(*in_shape, *out_shape))


def _select(state_dict: Mapping[str, Any], prefix: str, caller: str) -> dict[str, np.ndarray]:
    """The entries under `prefix`, with the prefix stripped, as numpy copies."""
    selected = {k[len(prefix) :]: np.asarray(v).copy() for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        keys = sorted(state_dict)
        shown = keys[:20] + (["..."] if len(keys) > 20 else [])
        raise ValueError(f"{caller}: no key of the state_dict starts with prefix {prefix!r}; keys are {shown}")
    return selected


def _weight(sd: Mapping[str, np.ndarray], key: str, prefix: str, rows: int, cols: int | None = None) -> np.ndarray:
    """sd[key], checked to be 2-D with `rows` rows (and `cols` columns when given)."""
    w = sd[key]
    if w.ndim != 2 or w.shape[0] != rows or (cols is not None and w.shape[1] != cols):
        want = f"({rows}, {cols})" if cols is not None else f"({rows}, in_features)"
        raise ValueError(f"{prefix}{key} has shape {w.shape}, expected {want}")
    return w


def load_multihead_attention(
    state_dict: Mapping[str, Any], *, num_heads: int, prefix: str = "", add_zero_attn: bool = False
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Variables for `seqjax.nn.MultiHeadAttention` from a `torch.nn.MultiheadAttention` state_dict.

    Use them with `MultiHeadAttention(num_heads=num_heads, use_bias=bias)` where `bias` is the torch module's (the
    state_dict holds `in_proj_bias` exactly when it was True); `qkv_features` and `out_features` default to E.
    Self-attention is `apply(variables, x)`, cross-attention `apply(variables, query, key_value)`.

    Args:
      state_dict: `torch.nn.MultiheadAttention(...).state_dict()` (tensors or numpy arrays), or the state_dict of
        a bigger model holding one, selected with `prefix`.
      num_heads: N, torch's `num_heads`; must divide E.
      prefix: the attention module's key prefix in `state_dict`, e.g. "layers.0.self_attn." for
        `nn.TransformerEncoder`; "" for the module's own state_dict.
      add_zero_attn: torch's constructor flag, which the state_dict does not record; not supported.

    Returns:
      `{"params": {"query"|"key"|"value": {"kernel" [F|F', N, H], "bias" [N, H]}, "out": {"kernel" [N, H, E],
      "bias" [E]}}}` (no "bias" entries when torch had `bias=False`).

    Raises:
      ValueError: no key under `prefix`, missing, unexpected or misshapen keys, or N not dividing E.
      NotImplementedError: `bias_k` / `bias_v` (torch's `add_bias_kv=True`), `add_zero_attn`, or kdim != vdim
        (our layer projects keys and values from one `inputs_kv`).
    """
    name = "load_multihead_attention"
    if add_zero_attn:
        raise NotImplementedError(f"{name}: add_zero_attn=True has no seqjax.nn.MultiHeadAttention equivalent")
    sd = _select(state_dict, prefix, name)
    if "bias_k" in sd or "bias_v" in sd:
        raise NotImplementedError(
            f"{name}: {prefix}bias_k / {prefix}bias_v (torch's add_bias_kv=True) have no seqjax.nn.MultiHeadAttention "
            "equivalent"
        )
    unexpected = sorted(set(sd) - set(_MHA_WEIGHTS) - set(_MHA_BIASES))
    if unexpected:
        raise ValueError(
            f"{name}: unexpected keys {[prefix + k for k in unexpected]} (expected a subset of "
            f"{[prefix + k for k in (*_MHA_WEIGHTS, *_MHA_BIASES)]})"
        )
    if "out_proj.weight" not in sd:
        raise ValueError(f"{name}: missing key {prefix}out_proj.weight; got keys {sorted(prefix + k for k in sd)}")
    w_out = sd["out_proj.weight"]
    if w_out.ndim != 2 or w_out.shape[0] != w_out.shape[1]:
        raise ValueError(f"{name}: {prefix}out_proj.weight has shape {w_out.shape}, expected (E, E)")
    e = w_out.shape[0]
    if not isinstance(num_heads, numbers.Integral) or num_heads < 1 or e % num_heads:
        raise ValueError(
            f"{name}: num_heads ({num_heads!r}) must be a positive divisor of embed_dim E = {e} "
            f"({prefix}out_proj.weight has shape {w_out.shape})"
        )
    n, h = int(num_heads), e // int(num_heads)

    separate = [k for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight") if k in sd]
    if "in_proj_weight" in sd:
        if separate:
            raise ValueError(f"{name}: both {prefix}in_proj_weight and {[prefix + k for k in separate]} are present")
        w_q, w_k, w_v = np.split(_weight(sd, "in_proj_weight", prefix, 3 * e, e), 3)
    elif len(separate) == 3:
        w_q = _weight(sd, "q_proj_weight", prefix, e, e)
        w_k = _weight(sd, "k_proj_weight", prefix, e)
        w_v = _weight(sd, "v_proj_weight", prefix, e)
        if w_k.shape[1] != w_v.shape[1]:
            raise NotImplementedError(
                f"{name}: kdim != vdim ({prefix}k_proj_weight {w_k.shape}, {prefix}v_proj_weight {w_v.shape}); "
                "seqjax.nn.MultiHeadAttention projects keys and values from one inputs_kv"
            )
    else:
        raise ValueError(
            f"{name}: missing {prefix}in_proj_weight (or all of {prefix}q_proj_weight, {prefix}k_proj_weight, "
            f"{prefix}v_proj_weight); got keys {sorted(prefix + k for k in sd)}"
        )

    params = {
        "query": {"kernel": linear_to_kernel(w_q, out_shape=(n, h))},
        "key": {"kernel": linear_to_kernel(w_k, out_shape=(n, h))},
        "value": {"kernel": linear_to_kernel(w_v, out_shape=(n, h))},
        "out": {"kernel": linear_to_kernel(w_out, in_shape=(n, h))},
    }
    present = [k for k in _MHA_BIASES if k in sd]
    if len(present) == 1:
        raise ValueError(
            f"{name}: {prefix}{present[0]} is present without {prefix}{next(k for k in _MHA_BIASES if k not in sd)}; "
            "torch's bias=True gives both, bias=False neither"
        )
    if present:
        b_in, b_out = sd["in_proj_bias"], sd["out_proj.bias"]
        if b_in.shape != (3 * e,):
            raise ValueError(f"{name}: {prefix}in_proj_bias has shape {b_in.shape}, expected ({3 * e},)")
        if b_out.shape != (e,):
            raise ValueError(f"{name}: {prefix}out_proj.bias has shape {b_out.shape}, expected ({e},)")
        for proj, b in zip(("query", "key", "value"), np.split(b_in, 3), strict=True):
            params[proj]["bias"] = np.ascontiguousarray(b.reshape(n, h))
        params["out"]["bias"] = b_out
    return {"params": params}


def _load_recurrent(
    state_dict: Mapping[str, Any], gates: int, caller: str, num_layers: int, bidirectional: bool, prefix: str
) -> dict:
    """torch.nn.{LSTM,GRU,RNN} weights `weight_ih_l{k}[_reverse]` [G*H, in], `weight_hh_l{k}...` [G*H, H] and the two
    biases → `{"params": {"l{k}[_reverse]": {"cell": {"input": {kernel, bias}, "hidden": {kernel, bias}}}}}` for
    seqjax's stacked layers (same gate order, so the kernels are the transposes)."""
    sd = _select(state_dict, prefix, caller)
    suffixes = [""] + (["_reverse"] if bidirectional else [])
    expected = {
        f"{kind}_{part}_l{layer}{sfx}"
        for layer in range(num_layers)
        for sfx in suffixes
        for kind in ("weight", "bias")
        for part in ("ih", "hh")
    }
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if "weight_ih_l0" not in sd or any(k.startswith("weight") for k in missing):
        raise ValueError(
            f"{caller}: missing keys {[prefix + k for k in missing]} (num_layers={num_layers}, "
            f"bidirectional={bidirectional})"
        )
    if extra:
        raise ValueError(f"{caller}: unexpected keys {[prefix + k for k in extra]}: check num_layers and bidirectional")
    rows = sd["weight_ih_l0"].shape[0]
    if rows % gates:
        raise ValueError(f"{caller}: {prefix}weight_ih_l0 has {rows} rows, not a multiple of {gates} gates")
    hidden = rows // gates
    params = {}
    for layer in range(num_layers):
        for sfx in suffixes:
            tag = f"l{layer}{sfx}"
            cell = {}
            for part, name in (("ih", "input"), ("hh", "hidden")):
                w = _weight(sd, f"weight_{part}_{tag}", prefix, rows, hidden if part == "hh" else None)
                bias_key = f"bias_{part}_{tag}"
                if bias_key in sd and sd[bias_key].shape != (rows,):
                    raise ValueError(f"{prefix}{bias_key} has shape {sd[bias_key].shape}, expected ({rows},)")
                bias = sd.get(bias_key, np.zeros(rows, w.dtype))
                cell[name] = {"kernel": linear_to_kernel(w), "bias": bias}
            params[tag] = {"cell": cell}
    return {"params": params}


def load_lstm(state_dict: Mapping[str, Any], *, num_layers: int = 1, bidirectional: bool = False, prefix: str = ""):
    """`torch.nn.LSTM` state_dict (numpy arrays or tensors) → variables for `seqjax.nn.LSTM` with the same
    `num_layers` and `bidirectional`. A missing bias (`bias=False` in torch) loads as zeros."""
    return _load_recurrent(state_dict, 4, "load_lstm", num_layers, bidirectional, prefix)


def load_gru(state_dict: Mapping[str, Any], *, num_layers: int = 1, bidirectional: bool = False, prefix: str = ""):
    """`torch.nn.GRU` state_dict → variables for `seqjax.nn.GRU`; see `load_lstm`."""
    return _load_recurrent(state_dict, 3, "load_gru", num_layers, bidirectional, prefix)


def load_rnn(state_dict: Mapping[str, Any], *, num_layers: int = 1, bidirectional: bool = False, prefix: str = ""):
    """`torch.nn.RNN` state_dict → variables for `seqjax.nn.SimpleRNN` (same `nonlinearity`); see `load_lstm`."""
    return _load_recurrent(state_dict, 1, "load_rnn", num_layers, bidirectional, prefix)
