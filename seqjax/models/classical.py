"""The classical sequence models that come before RNNs and attention, for scalar series.

Glossary: B batch, T time, τ window, K states (discrete Markov chains).

Every model maps a series `x [B, T]` to one-step-ahead predictions `x̂ [B, T]`, where `x̂[:, t]` is computed from
`x[:, :t]` only (x̂[:, 0] sees nothing and predicts from a learned bias). `predict_ahead` feeds predictions back in
to forecast k steps past the end of a prefix.

  NaiveModel                 conditions on the whole past x_1..x_{t-1}: the input grows with t, so it is padded
                             to a fixed `max_len` (and the model cannot run past it) — the problem the others solve.
  AutoregressiveModel        conditions on the last τ values only (a fixed window; earlier values are ignored).
  MarkovModel                conditions on the previous value alone (first-order Markov assumption).
  LatentAutoregressiveModel  keeps a hidden state h_t = g(h_{t-1}, x_{t-1}) summarising the past (g: any of our
                             recurrent cells) and predicts x̂_t from h_t.

For discrete sequences, `markov_fit` gives the closed-form maximum-likelihood initial distribution and transition
matrix, `markov_log_likelihood` the exact log p(x_1..x_T) = log p(x_1) + Σ_t log p(x_t | x_{t-1}), and
`markov_sample` draws sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.nn.recurrent import RNN, GRUCell

Array = jax.Array

__all__ = [
    "AutoregressiveModel",
    "LatentAutoregressiveModel",
    "MarkovModel",
    "NaiveModel",
    "markov_fit",
    "markov_log_likelihood",
    "markov_sample",
    "predict_ahead",
]


def _check_series(name: str, x: Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} expects a series [B, T], got shape {x.shape}")


def _shift_right(x: Array) -> Array:
    """[B, T] → [B, T] with x_prev[:, t] = x[:, t-1] and 0 at t = 0."""
    return jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]


class _MLP(nn.Module):
    hidden: int
    activation: Callable[[Array], Array] = nn.tanh

    @nn.compact
    def __call__(self, feats: Array) -> Array:  # [..., in] → [...]
        return nn.Dense(1)(self.activation(nn.Dense(self.hidden)(feats)))[..., 0]


class NaiveModel(nn.Module):
    """x̂_t = MLP(x_1..x_{t-1} padded with zeros to `max_len`, plus a mask of which inputs are real)."""

    max_len: int
    hidden: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_series("NaiveModel", x)
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(
                f"NaiveModel(max_len={self.max_len}) cannot see a series of length {t}: the whole past "
                f"must fit its fixed input"
            )
        seen = jnp.arange(self.max_len)[None, :] < jnp.arange(t)[:, None]  # [T, max_len]: past of step t
        padded = jnp.pad(x, ((0, 0), (0, self.max_len - t)))  # [B, max_len]
        past = jnp.where(seen[None], padded[:, None, :], 0.0)  # [B, T, max_len]
        feats = jnp.concatenate([past, jnp.broadcast_to(seen, past.shape).astype(x.dtype)], axis=-1)
        return _MLP(self.hidden)(feats)


class AutoregressiveModel(nn.Module):
    """x̂_t = MLP(x_{t-τ}, ..., x_{t-1}) (values before the series start count as 0)."""

    tau: int
    hidden: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_series("AutoregressiveModel", x)
        if self.tau < 1:
            raise ValueError(f"AutoregressiveModel: tau must be >= 1, got {self.tau}")
        padded = jnp.pad(x, ((0, 0), (self.tau, 0)))  # [B, τ + T]
        windows = jnp.stack([padded[:, i : i + x.shape[1]] for i in range(self.tau)], axis=-1)  # [B, T, τ]
        return _MLP(self.hidden)(windows)


class MarkovModel(nn.Module):
    """x̂_t = f(x_{t-1}), f a small MLP: the next value depends on the previous one alone."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_series("MarkovModel", x)
        return _MLP(self.hidden)(_shift_right(x)[..., None])


class LatentAutoregressiveModel(nn.Module):
    """h_t = g(h_{t-1}, x_{t-1}), x̂_t = W h_t + b, with g any seqjax cell (default: a GRU cell)."""

    hidden: int = 32
    cell_factory: Callable[[int], nn.Module] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_series("LatentAutoregressiveModel", x)
        cell = (self.cell_factory or GRUCell)(self.hidden)
        h = RNN(cell)(_shift_right(x)[..., None])  # [B, T, hidden]
        return nn.Dense(1)(h)[..., 0]


def predict_ahead(model: nn.Module, variables: Any, prefix: Array, k: int) -> Array:
    """Forecasts k values past `prefix [B, T]` by feeding each prediction back in; returns `[B, k]`."""
    _check_series("predict_ahead", prefix)
    x = prefix
    out = []
    for _ in range(k):
        nxt = model.apply(variables, jnp.pad(x, ((0, 0), (0, 1))))[:, -1]  # the prediction for position T
        out.append(nxt)
        x = jnp.concatenate([x, nxt[:, None]], axis=1)
    return jnp.stack(out, axis=1)


# ---------------------------------------------------------------------------------------------- discrete Markov


def markov_fit(sequences: Any, num_states: int, *, smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood first-order Markov chain from integer sequences (a list of 1-D arrays, any lengths).

    Returns (initial [K], transitions [K, K]) with transitions[i, j] = count(i→j) / count(i→·), the closed-form MLE
    (plus `smoothing` pseudo-counts per cell); a state never left gets a uniform row."""
    init = np.full(num_states, smoothing, np.float64)
    counts = np.full((num_states, num_states), smoothing, np.float64)
    for seq in sequences:
        seq = np.asarray(seq)
        if seq.ndim != 1 or len(seq) == 0 or seq.min() < 0 or seq.max() >= num_states:
            raise ValueError(f"markov_fit: each sequence must be a non-empty 1-D array of states in [0, {num_states})")
        init[seq[0]] += 1
        np.add.at(counts, (seq[:-1], seq[1:]), 1)
    rows = counts.sum(1, keepdims=True)
    trans = np.where(rows > 0, counts / np.where(rows > 0, rows, 1), 1.0 / num_states)
    return init / init.sum(), trans


def markov_log_likelihood(sequence: Any, initial: Any, transitions: Any) -> float:
    """log p(x_1..x_T) = log p(x_1) + Σ_{t>1} log p(x_t | x_{t-1})."""
    seq = np.asarray(sequence)
    initial, transitions = np.asarray(initial), np.asarray(transitions)
    with np.errstate(divide="ignore"):
        return float(np.log(initial[seq[0]]) + np.log(transitions[seq[:-1], seq[1:]]).sum())


def markov_sample(key: Array, initial: Any, transitions: Any, length: int, num_samples: int = 1) -> Array:
    """Draws `[num_samples, length]` sequences from the chain."""
    initial, transitions = jnp.asarray(initial), jnp.asarray(transitions)
    k0, key = jax.random.split(key)
    x0 = jax.random.categorical(k0, jnp.log(initial), shape=(num_samples,))

    def step(x, k):
        nxt = jax.random.categorical(k, jnp.log(transitions[x]))
        return nxt, nxt

    _, rest = jax.lax.scan(step, x0, jax.random.split(key, length - 1))
    return jnp.concatenate([x0[:, None], rest.T], axis=1)
