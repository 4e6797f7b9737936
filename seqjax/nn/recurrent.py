"""Recurrent cells with PyTorch's conventions, and one scan wrapper for all of them.

Glossary: B batch (any leading dims, B...), T time, F input features, H hidden features.

Cell contract (DESIGN.md): a cell is a Flax module called as `cell(carry, x) -> (carry, y)` on one time step
(x `[B..., F]`, y `[B..., H]`) with `cell.initialize_carry(rng, input_shape)` returning the zero state for inputs of
shape `input_shape = (*B, F)`. The LSTM carry is `(c, h)`; the GRU and simple RNN carry is `h`.

Parameter layout: every cell has an "input" projection (kernel `[F, G*H]`, bias `[G*H]`) and a "hidden" projection
(kernel `[H, G*H]`, bias `[G*H]`), with G gates stacked in PyTorch's order (LSTM i, f, g, o; GRU r, z, n), so that
`torch.nn.LSTM`'s `weight_ih_l0` is the transpose of our input kernel and both biases map one to one.

`RNN(cell)` runs a cell over time with `nn.scan` (parameters broadcast, dropout RNGs split per step), with
per-sequence lengths (outputs past a sequence's length are zero; the final carry is the one at its length) and
reversal within each sequence's own length, as PyTorch's packed sequences behave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqjax.kernels import fused_gru, fused_lstm, gru_layer, lstm_layer  # noqa: F401  (fused_*: re-exported)
from seqjax.kernels.gru import gru_gates
from seqjax.kernels.lstm import lstm_gates

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
Carry = Any

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def _check_step(name: str, carry_h: Array, x: Array, features: int) -> None:
    if x.ndim < 1 or carry_h.shape[:-1] != x.shape[:-1] or carry_h.shape[-1] != features:
        raise ValueError(
            f"{name}: expected x [B..., F] and a carry [B..., {features}] with the same batch dims; got x {x.shape} "
            f"and carry {carry_h.shape}"
        )


class _Cell(nn.Module):
    """Shared attributes and `initialize_carry`."""

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: lax.PrecisionLike = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()

    def _project(self, x: Array, h: Array, gates: int, input_bias_init: Initializer | None = None):
        """x W_ih + b_ih and h W_hh + b_hh, each [B..., gates*H], as Dense layers named "input" and "hidden"."""
        if self.features < 1:
            raise ValueError(f"{type(self).__name__}: features must be >= 1, got {self.features}")

        def dense(name, kernel_init, bias_init):
            return nn.Dense(
                gates * self.features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=kernel_init,
                bias_init=bias_init,
                name=name,
            )

        xi = dense("input", self.kernel_init, input_bias_init or self.bias_init)(x)
        return xi, dense("hidden", self.recurrent_kernel_init, self.bias_init)(h)

    def _zeros(self, input_shape: tuple[int, ...]) -> Array:
        return jnp.zeros((*tuple(input_shape)[:-1], self.features), self.dtype or self.param_dtype)


class SimpleRNNCell(_Cell):
    """Elman RNN cell, as `torch.nn.RNNCell`: h' = act(x W_ih + b_ih + h W_hh + b_hh), y = h'.

    `activation` is "tanh" (default) or "relu". Carry: h `[B..., H]`.
    """

    activation: str = "tanh"

    @nn.compact
    def __call__(self, carry: Array, x: Array) -> tuple[Array, Array]:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"SimpleRNNCell: activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )
        _check_step("SimpleRNNCell", carry, x, self.features)
        xi, hh = self._project(x, carry, 1)
        h = _ACTIVATIONS[self.activation](xi + hh)
        return h, h

    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> Array:
        del rng
        return self._zeros(input_shape)


class LSTMCell(_Cell):
    """LSTM cell, as `torch.nn.LSTMCell` (gate order i, f, g, o):

        i = σ(x W_ii + b_ii + h W_hi + b_hi)      input gate: what to store in the cell state
        f = σ(x W_if + b_if + h W_hf + b_hf)      forget gate: what to throw away from it
        g = tanh(x W_ig + b_ig + h W_hg + b_hg)   candidate values
        o = σ(x W_io + b_io + h W_ho + b_ho)      output gate: what of the cell state to emit
        c' = f * c + i * g,   h' = o * tanh(c'),   y = h'

    Carry: (c, h), each `[B..., H]`. `forget_bias` is added to the initial input bias of the forget gate (1.0 is the
    common choice, Jozefowicz et al. 2015); PyTorch initialises it to 0 like the other biases.
    """

    forget_bias: float = 0.0

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], x: Array) -> tuple[tuple[Array, Array], Array]:
        c, h = carry
        _check_step("LSTMCell", h, x, self.features)
        base, hdim, fb = self.bias_init, self.features, self.forget_bias

        def bias_init(key, shape, dtype=jnp.float32):
            b = base(key, shape, dtype)
            return b.at[hdim : 2 * hdim].add(jnp.asarray(fb, dtype)) if fb else b

        # Only the input bias (torch's b_ih) carries forget_bias; the two biases add up in every gate.
        xi, hh = self._project(x, h, 4, bias_init if fb else None)
        gates = xi + hh
        *_, c, h = lstm_gates(gates, c.astype(gates.dtype), self.features)
        return (c, h), h

    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> tuple[Array, Array]:
        del rng
        return self._zeros(input_shape), self._zeros(input_shape)


class GRUCell(_Cell):
    """GRU cell, as `torch.nn.GRUCell` (gate order r, z, n; the reset gate multiplies the hidden matmul):

        r = σ(x W_ir + b_ir + h W_hr + b_hr)          reset gate
        z = σ(x W_iz + b_iz + h W_hz + b_hz)          update gate
        n = tanh(x W_in + b_in + r * (h W_hn + b_hn))  candidate state
        h' = (1 - z) * n + z * h,   y = h'

    Carry: h `[B..., H]`.
    """

    @nn.compact
    def __call__(self, carry: Array, x: Array) -> tuple[Array, Array]:
        _check_step("GRUCell", carry, x, self.features)
        xi, hh = self._project(x, carry, 3)
        *_, h = gru_gates(xi, hh, carry.astype(xi.dtype), self.features)
        return h, h

    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> Array:
        del rng
        return self._zeros(input_shape)


def flip_sequences(inputs: Array, seq_lengths: Array | None) -> Array:
    """Reverses each sequence of `inputs [B, T, ...]` within its own length; positions past the length stay put."""
    t = inputs.shape[1]
    if seq_lengths is None:
        return inputs[:, ::-1]
    steps = jnp.arange(t)[None, :]  # [1, T]
    lengths = seq_lengths[:, None]
    idx = jnp.where(steps < lengths, lengths - 1 - steps, steps)  # [B, T]
    idx = idx.reshape(idx.shape + (1,) * (inputs.ndim - 2))
    return jnp.take_along_axis(inputs, idx, axis=1)


def _check_lengths(seq_lengths: Array, batch: int, t: int) -> Array:
    seq_lengths = jnp.asarray(seq_lengths)
    if seq_lengths.shape != (batch,) or not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise ValueError(
            f"seq_lengths must be integers of shape [B] = ({batch},), got {seq_lengths.dtype}{seq_lengths.shape}"
        )
    try:  # values can only be checked when they are concrete (not under jit)
        concrete = np.asarray(seq_lengths)
    except jax.errors.TracerArrayConversionError:
        return seq_lengths
    if concrete.min(initial=0) < 0 or concrete.max(initial=0) > t:
        raise ValueError(f"seq_lengths must lie in [0, T={t}]; got {concrete.tolist()}")
    return seq_lengths


class RNN(nn.Module):
    """Runs a cell over time: inputs `[B, T, F]` → outputs `[B, T, H]` (and the final carry with `return_carry`).

    Attributes:
      cell: any cell with the contract in the module docstring.
      reverse: process each sequence from its last valid step to its first (within `seq_lengths`); outputs are
        returned in the original time order.
      return_carry: return `(carry, outputs)` instead of `outputs`.
      unroll: time steps per scan iteration (a speed knob).
      fused: run an `LSTMCell` through `seqjax.kernels.lstm_layer`, a `GRUCell` through `gru_layer` when that gives
        the same function: no `seq_lengths`, `unroll=1`, and inputs, carry and parameters all float32 or all
        float64. Those run seqjax's C++ CPU kernels where they apply (`seqjax.kernels.cpu.lstm.applies`), else
        `fused_lstm` / `fused_gru` (hand-written backward passes in JAX ops); BENCHMARKS.md has the speeds.
        Both are `jax.custom_vjp`s, so forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) needs `fused=False`.

    Call with `initial_carry` (default: the cell's zero state), `seq_lengths [B]` (default: all T) and optionally
    `return_carry` (overrides the attribute). Outputs at
    t >= seq_lengths[b] are zero and the final carry of sequence b is the one after its last valid step, as PyTorch
    returns them for packed sequences.
    """

    cell: nn.Module
    reverse: bool = False
    return_carry: bool = False
    unroll: int = 1
    fused: bool = True

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        initial_carry: Carry | None = None,
        seq_lengths: Array | None = None,
        return_carry: bool | None = None,
    ):
        if inputs.ndim != 3:
            raise ValueError(f"RNN expects inputs [B, T, F], got shape {inputs.shape}")
        b, t, _ = inputs.shape
        if seq_lengths is not None:
            seq_lengths = _check_lengths(seq_lengths, b, t)
        carry = initial_carry
        if carry is None:
            carry = self.cell.initialize_carry(jax.random.key(0), (b, inputs.shape[-1]))
        else:
            expected = jax.tree.map(jnp.shape, self.cell.initialize_carry(jax.random.key(0), (b, inputs.shape[-1])))
            if jax.tree.map(jnp.shape, carry) != expected:
                raise ValueError(f"initial_carry has shapes {jax.tree.map(jnp.shape, carry)}, expected {expected}")
        xs = flip_sequences(inputs, seq_lengths) if self.reverse else inputs
        return_carry = self.return_carry if return_carry is None else return_carry
        fuse = self._use_fused(xs, carry, seq_lengths)
        if fuse:
            # One step creates (init) or checks the parameters; under jit its result is dropped as dead code.
            self.cell(carry, xs[:, 0])
            p = self.cell.variables["params"]
            fuse = all(a.dtype == xs.dtype for a in jax.tree.leaves(p))  # parameters given in another dtype
        if fuse:
            w_ih, w_hh = p["input"]["kernel"], p["hidden"]["kernel"]
            zero = jnp.zeros(w_hh.shape[1], xs.dtype)
            b_ih, b_hh = (p["input"]["bias"], p["hidden"]["bias"]) if self.cell.use_bias else (zero, zero)
            if isinstance(self.cell, LSTMCell):
                ys, carry = lstm_layer(xs, carry[0], carry[1], w_ih, w_hh, b_ih + b_hh, self.cell.precision)
            else:
                ys, carry = gru_layer(xs, carry, w_ih, w_hh, b_ih, b_hh, self.cell.precision)
            if self.reverse:
                ys = ys[:, ::-1]
            return (carry, ys) if return_carry else ys
        valid = None if seq_lengths is None else jnp.arange(t)[None, :] < seq_lengths[:, None]  # [B, T]

        def step(cell, carry, x_and_valid):
            x, ok = x_and_valid
            new_carry, y = cell(carry, x)
            if ok is not None:  # past a sequence's end: keep its carry, emit zeros
                new_carry = jax.tree.map(lambda n, o: jnp.where(ok[:, None], n, o.astype(n.dtype)), new_carry, carry)
                y = jnp.where(ok[:, None], y, jnp.zeros((), y.dtype))
            return new_carry, y

        scan = nn.scan(
            step,
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=1,
            out_axes=1,
            unroll=self.unroll,
        )
        carry, ys = scan(self.cell, carry, (xs, valid))
        if self.reverse:
            ys = flip_sequences(ys, seq_lengths)
        return (carry, ys) if return_carry else ys

    def _use_fused(self, xs: Array, carry: Carry, seq_lengths: Array | None) -> bool:
        cell = self.cell
        if not (self.fused and type(cell) in (LSTMCell, GRUCell) and seq_lengths is None and self.unroll == 1):
            return False
        carry_dtypes = (jnp.dtype(a.dtype) for a in jax.tree.leaves(carry))
        dtypes = {jnp.dtype(xs.dtype), jnp.dtype(cell.param_dtype), *carry_dtypes}
        if cell.dtype is not None:
            dtypes.add(jnp.dtype(cell.dtype))
        return len(dtypes) == 1 and dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)} and xs.shape[1] > 0


class Bidirectional(nn.Module):
    """Runs `forward_rnn` and `backward_rnn` (an `RNN` with `reverse=True`, reversing within `seq_lengths`) over the
    same inputs and concatenates their outputs: `[B, T, H_fwd + H_bwd]`; with `return_carry`, also
    `(carry_fwd, carry_bwd)`."""

    forward_rnn: RNN
    backward_rnn: RNN
    return_carry: bool = False

    @nn.compact
    def __call__(self, inputs: Array, *, seq_lengths: Array | None = None):
        if not self.backward_rnn.reverse:
            raise ValueError("Bidirectional: backward_rnn must be an RNN with reverse=True")
        cf, yf = self.forward_rnn(inputs, seq_lengths=seq_lengths, return_carry=True)
        cb, yb = self.backward_rnn(inputs, seq_lengths=seq_lengths, return_carry=True)
        out = jnp.concatenate([yf, yb], axis=-1)
        return ((cf, cb), out) if self.return_carry else out


class _StackedRNN(nn.Module):
    """Stacked, optionally bidirectional recurrent layers with PyTorch's semantics (see `LSTM`)."""

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: lax.PrecisionLike = None
    unroll: int = 1
    fused: bool = True  # RNN.fused: fused_lstm / fused_gru where they apply; False for forward-mode autodiff

    def make_cell(self) -> nn.Module:
        """A fresh cell with parent=None, so that it belongs to its RNN (params under l{k}/cell), not to this layer."""
        raise NotImplementedError

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        seq_lengths: Array | None = None,
        *,
        initial_state: Any = None,
        deterministic: bool = True,
    ):
        """Args:
          inputs: `[B, T, F]`.
          seq_lengths: `[B]` valid lengths (as PyTorch's packed sequences); outputs past them are zero.
          initial_state: h_0 (GRU, RNN) or (h_0, c_0) (LSTM), each `[num_layers * D, B, hidden]`; zeros if None.
          deterministic: no dropout between layers when True.

        Returns:
          `(outputs [B, T, D * hidden], final_state)`, final_state shaped like `initial_state`, ordered as PyTorch
          orders it: layer 0 forward, layer 0 backward, layer 1 forward, ...
        """
        name = type(self).__name__
        if self.num_layers < 1 or self.hidden_size < 1:
            raise ValueError(
                f"{name}: num_layers and hidden_size must be >= 1, got {self.num_layers}, {self.hidden_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {self.dropout}")
        if inputs.ndim != 3:
            raise ValueError(f"{name} expects inputs [B, T, F], got shape {inputs.shape}")
        directions = 2 if self.bidirectional else 1
        b = inputs.shape[0]
        lstm = isinstance(self, LSTM)
        state_shape = (self.num_layers * directions, b, self.hidden_size)
        if initial_state is not None:
            shapes = [jnp.shape(s) for s in (initial_state if lstm else (initial_state,))]
            if any(s != state_shape for s in shapes) or len(shapes) != (2 if lstm else 1):
                raise ValueError(f"{name}: initial_state must be {'(h_0, c_0), each ' if lstm else ''}{state_shape}")
        x, finals = inputs, []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                k = layer * directions + d
                carry = None
                if initial_state is not None:  # ours is (c, h) for the LSTM, torch's (h, c)
                    carry = (initial_state[1][k], initial_state[0][k]) if lstm else initial_state[k]
                rnn = RNN(
                    self.make_cell(),
                    reverse=d == 1,
                    return_carry=True,
                    unroll=self.unroll,
                    fused=self.fused,
                    name=f"l{layer}" + ("_reverse" if d else ""),
                )
                carry, y = rnn(x, initial_carry=carry, seq_lengths=seq_lengths)
                outs.append(y)
                finals.append(carry)
            x = outs[0] if directions == 1 else jnp.concatenate(outs, axis=-1)
            if layer < self.num_layers - 1 and self.dropout > 0.0:
                x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        if lstm:
            return x, (jnp.stack([h for _, h in finals]), jnp.stack([c for c, _ in finals]))
        return x, jnp.stack(finals)


class LSTM(_StackedRNN):
    """`torch.nn.LSTM(batch_first=True)` in Flax: `LSTM(hidden_size, num_layers=1, bidirectional=False, dropout=0.0)`
    applied as `(inputs [B, T, F], seq_lengths=None)` → `(outputs [B, T, D*H], (h_n, c_n))`, h_n and c_n each
    `[num_layers * D, B, H]`. Parameters of layer l (direction suffix "_reverse") live under `l{l}/cell`.
    `seqjax.interop.torch.load_lstm` converts a torch state_dict."""

    forget_bias: float = 0.0

    def make_cell(self) -> nn.Module:
        return LSTMCell(
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            forget_bias=self.forget_bias,
            parent=None,
        )


class GRU(_StackedRNN):
    """`torch.nn.GRU(batch_first=True)` in Flax; returns `(outputs, h_n)`. See `LSTM`."""

    def make_cell(self) -> nn.Module:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, parent=None)
        return GRUCell(self.hidden_size, **kw)


class SimpleRNN(_StackedRNN):
    """`torch.nn.RNN(batch_first=True, nonlinearity=...)` in Flax; returns `(outputs, h_n)`. See `LSTM`."""

    nonlinearity: str = "tanh"

    def make_cell(self) -> nn.Module:
        return SimpleRNNCell(
            self.hidden_size,
            activation=self.nonlinearity,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            parent=None,
        )
