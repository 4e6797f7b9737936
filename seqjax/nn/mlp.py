"""The Transformer's position-wise feed-forward block, plain or gated (GLU family: GEGLU, SwiGLU, ...).

Glossary: B batch (any number of leading dims, written B...), D input width, M hidden width (`mlp_dim`),
O output width (`out_dim`, default D).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


class MlpBlock(nn.Module):
    """Dense → activation → dropout → Dense, or its gated variant.

        plain:  y = wo(dropout(act(wi(x))))
        gated:  y = wo(dropout(act(wi(x)) * wi_gate(x)))     (Shazeer 2020, "GLU Variants Improve Transformer")

    With `activation=nn.silu` the gated form is LLaMA's SwiGLU; with `nn.gelu` it is T5 v1.1's GEGLU. Parameters are
    the `nn.Dense` submodules "wi" `[D, M]`, "wi_gate" `[D, M]` (gated only) and "wo" `[M, O]`, each with a "kernel"
    and (with `use_bias`) a "bias".

    Attributes:
      mlp_dim: hidden width M (> 0).
      out_dim: output width O; defaults to the input width D.
      activation: elementwise nonlinearity (default `nn.gelu`, tanh approximation).
      gated: use the GLU variant, which adds the "wi_gate" projection.
      dropout_rate: dropout on the hidden activations, in [0, 1); active only when `deterministic` is False, and
        then needs the "dropout" PRNG stream.
      use_bias: biases on all projections.
      dtype: compute dtype (default: inferred from the inputs and params, as `nn.Dense` does).
      param_dtype: storage dtype of the parameters.
      precision: matmul precision.
      kernel_init, bias_init: initialisers of every projection.
    """

    mlp_dim: int
    out_dim: int | None = None
    activation: Callable[[Array], Array] = nn.gelu
    gated: bool = False
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: lax.PrecisionLike = None
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros_init()

    def _check_config(self) -> None:
        if not isinstance(self.mlp_dim, int) or self.mlp_dim < 1:
            raise ValueError(f"MlpBlock: mlp_dim must be a positive int, got mlp_dim={self.mlp_dim!r}")
        if self.out_dim is not None and (not isinstance(self.out_dim, int) or self.out_dim < 1):
            raise ValueError(f"MlpBlock: out_dim must be a positive int or None, got out_dim={self.out_dim!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"MlpBlock: dropout_rate must be in [0, 1), got dropout_rate={self.dropout_rate!r}")

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name=name,
        )

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
        """Args:
          inputs: `[B..., D]`.
          deterministic: disables dropout.

        Returns:
          `[B..., O]`.
        """
        self._check_config()
        inputs = jnp.asarray(inputs)
        if inputs.ndim < 1:
            raise ValueError(f"MlpBlock expects inputs [B..., D] (rank >= 1), got shape {inputs.shape}")
        out_dim = self.out_dim or inputs.shape[-1]
        # Rematerialised: the backward pass keeps the activation's input alone and recomputes the elementwise
        # function from it (autodiff of the tanh GELU keeps three more [B..., M] arrays; BENCHMARKS.md, nanoGPT).
        h = jax.checkpoint(self.activation)(self._dense(self.mlp_dim, "wi")(inputs))  # [B..., M]
        if self.gated:
            h = h * self._dense(self.mlp_dim, "wi_gate")(inputs)  # [B..., M]
        h = nn.Dropout(rate=self.dropout_rate)(h, deterministic=deterministic)
        return self._dense(out_dim, "wo")(h)  # [B..., O]
