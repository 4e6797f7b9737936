"""Every kernel by name, and "auto": the choice per platform, made when the program is lowered.

Attention kernels take `seqjax.nn.scaled_dot_product_attention`'s arguments (flax's `attention_fn` convention):

  "auto"       (default) per platform, by `lax.platform_dependent`: CPU → "cpu" where the C++ kernel applies (self-
               attention from `MultiHeadAttention`'s fused projection), else "blocked"; NVIDIA GPU → "jax" (cuDNN
               where it applies, else XLA); TPU and other GPUs → "jax" with XLA's formulation; anything else →
               as on CPU. A program traced here and exported for another platform holds that platform's kernel.
  "reference"  plain softmax with autodiff, the definition (kernels/reference.py)
  "blocked"    seqjax's blocked kernel in JAX ops with a recomputing backward pass (kernels/blocked.py)
  "jax"        jax.nn.dot_product_attention: cuDNN on an NVIDIA GPU where it applies, else XLA (kernels/jax_nn.py)
  "cudnn"      jax.nn.dot_product_attention forced onto cuDNN (NVIDIA GPU only)
  "cpu"        the C++ kernel (kernels/cpu/attention.py) where it applies, else "blocked"

Old names, kept as aliases: "xla" (seqjax's default before the registry: the blocked kernel, and the C++ one inside
`MultiHeadAttention` on CPU) is "auto", which computes exactly that on CPU; use "blocked" to force the blocked
kernel. A kernel that cannot take a call (bias, the weights, dropout, shapes) hands it on, ending at "reference";
whether it can is decided in the kernel's own module (its `applies`).

Recurrent kernels: `lstm_layer` / `gru_layer` ("auto") run the C++ kernels ("cpu_lstm" / "cpu_gru") where they
apply and "fused_lstm" / "fused_gru" (custom VJPs in JAX ops) elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.kernels import blocked, common, jax_nn, reference
from seqjax.kernels.cpu import attention as cpu_attention
from seqjax.kernels.cpu import gru as cpu_gru
from seqjax.kernels.cpu import lstm as cpu_lstm
from seqjax.kernels.gru import fused_gru
from seqjax.kernels.lstm import fused_lstm

Array = jax.Array


class AttentionKernel:
    """A registered attention kernel: called with `scaled_dot_product_attention`'s arguments; `self_attention`
    (optional) takes `MultiHeadAttention`'s fused projection qkv `[B..., T, 3, N, H]` with q already scaled, as
    `self_attention(qkv, mask, *, dropout_rate, dropout_rng, precision, is_causal, segment_ids)` →
    `[B..., T, N, H]`, saving the slicing."""

    def __init__(self, name: str, attention: Callable, self_attention: Callable | None = None):
        self.name, self.attention, self.self_attention = name, attention, self_attention
        functools.update_wrapper(self, attention)

    def __call__(self, *args, **kwargs):
        return self.attention(*args, **kwargs)

    def __repr__(self) -> str:
        return f"AttentionKernel({self.name!r})"


def _per_platform(args, cpu, gpu, tpu):
    """cpu on CPU and on platforms not named, gpu on NVIDIA GPUs, tpu on TPUs and AMD GPUs. Each branch is traced
    once (the same function for several platforms is one branch); only the lowering platform's is compiled. Where
    cuDNN cannot be traced (no NVIDIA GPU here), the GPU branch is the TPU one: jax.nn's XLA formulation."""
    gpu = gpu if jax_nn.cudnn_available() else tpu
    return lax.platform_dependent(*args, cpu=cpu, cuda=gpu, rocm=tpu, tpu=tpu, default=cpu)


def auto_attention(query, key, value, mask=None, *, block_elements=blocked.DEFAULT_BLOCK_ELEMENTS, **kwargs):
    """The "auto" kernel on query, key, value (see the module docstring); `block_elements` is the blocked kernel's."""
    args = (jnp.asarray(query), jnp.asarray(key), jnp.asarray(value))
    return _per_platform(
        args,
        cpu=lambda *a: blocked.attention(*a, mask, block_elements=block_elements, **kwargs),
        gpu=lambda *a: jax_nn.attention(*a, mask, **kwargs),
        tpu=lambda *a: jax_nn.xla_attention(*a, mask, **kwargs),
    )


def auto_self_attention(
    qkv, mask=None, *, dropout_rate=0.0, dropout_rng=None, precision=None, is_causal=False, segment_ids=None
):
    """The "auto" kernel on a fused projection (`AttentionKernel.self_attention`)."""
    kw = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng, precision=precision, is_causal=is_causal,
              segment_ids=segment_ids)  # fmt: skip
    sliced = dict(kw, deterministic=dropout_rate == 0.0, scale=1.0)
    return _per_platform(
        (qkv,),
        cpu=lambda x: cpu_attention.self_attention(x, mask, **kw),
        gpu=lambda x: jax_nn.attention(*common.split_qkv(x), mask, **sliced),
        tpu=lambda x: jax_nn.xla_attention(*common.split_qkv(x), mask, **sliced),
    )


ATTENTION: dict[str, AttentionKernel] = {
    k.name: k
    for k in (
        AttentionKernel("auto", auto_attention, auto_self_attention),
        AttentionKernel("reference", reference.attention),
        AttentionKernel("blocked", blocked.attention, blocked.self_attention),
        AttentionKernel("jax", jax_nn.attention),
        AttentionKernel("cudnn", jax_nn.cudnn_attention),
        AttentionKernel("cpu", cpu_attention.attention, cpu_attention.self_attention),
    )
}
ALIASES = {"xla": "auto"}
NAMES = (*ATTENTION, *ALIASES)  # what `implementation=` accepts
BLOCKING = ("auto", "blocked")  # kernels that take `block_elements`


def attention_kernel(name: str) -> AttentionKernel:
    """The attention kernel registered as `name` (or an alias of it); a ValueError naming the choices otherwise."""
    if name not in NAMES:
        raise ValueError(f"implementation must be one of {NAMES}, got {name!r}")
    return ATTENTION[ALIASES.get(name, name)]


def lstm_layer(x: Array, c0: Array, h0: Array, w_ih: Array, w_hh: Array, b: Array, precision=None):
    """`fused_lstm`'s function (same arguments and results) by the C++ kernel where `cpu_lstm.applies`, else by
    `fused_lstm`."""
    if cpu_lstm.applies(x, c0, h0, w_ih, w_hh, b):
        bsz, hdim = x.shape[0], w_hh.shape[0]
        c0, h0 = (jnp.broadcast_to(a, (bsz, hdim)) for a in (c0, h0))
        return cpu_lstm.lstm(x, c0, h0, w_ih, w_hh, b, precision)
    return fused_lstm(x, c0, h0, w_ih, w_hh, b, precision)


def gru_layer(x: Array, h0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, precision=None):
    """`fused_gru`'s function (same arguments and results) by the C++ kernel where `cpu_gru.applies`, else by
    `fused_gru`."""
    if cpu_gru.applies(x, h0, w_ih, w_hh, b_ih, b_hh):
        return cpu_gru.gru(x, jnp.broadcast_to(h0, (x.shape[0], w_hh.shape[0])), w_ih, w_hh, b_ih, b_hh, precision)
    return fused_gru(x, h0, w_ih, w_hh, b_ih, b_hh, precision)


RECURRENT: dict[str, Callable] = {
    "lstm": lstm_layer,
    "gru": gru_layer,
    "fused_lstm": fused_lstm,
    "fused_gru": fused_gru,
    "cpu_lstm": cpu_lstm.lstm,
    "cpu_gru": cpu_gru.gru,
}
