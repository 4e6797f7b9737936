"""Weighted means that reduce the same way on one device, over `jax.pmap`'s devices and over evaluation batches.

A mean over a padded batch is a sum divided by a weight (the number of real tokens, say). Averaging the means of
shards — pmap's `pmean` of per-device losses, or the mean of per-batch evaluation losses — weighs a shard that holds
few real tokens as much as one that holds many, so the numbers depend on how the batch was split. A `Mean` keeps the
sum and the weight apart until the end: the steps add totals and weights over devices (`reduce_over`) and the loop
over evaluation batches (`Accumulator`), and only then divide (`value`). Under one device or `jax.jit` the global
batch is one array and its `Mean` is already global, so every mode gives the same numbers.

A task's `loss_fn` may return its loss, and `loss_fn` / `metric_fn` their metrics, as `Mean`s (the losses in
`seqjax.training.losses` give them with `as_mean=True`); a plain scalar counts as `Mean(x, 1)`, a mean over an
equally sized shard (right for unpadded batches). Ratios of means (perplexity = exp(mean loss)) carry their
`transform`, applied after the reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TINY = 1e-12  # the smallest weight divided by: an all-padding batch gives 0, not NaN


class Mean(flax.struct.PyTreeNode):
    """`transform(total / weight)`, with `total` and `weight` reduced (summed) separately before dividing.

    Attributes:
      total: the weighted sum (a float scalar).
      weight: the sum of the weights (a float scalar).
      transform: applied to the mean after every reduction (e.g. `jnp.exp` for a perplexity); None: the mean.
    """

    total: Array
    weight: Array
    transform: Callable | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def of(cls, values: Array, weights: Array | None = None) -> Mean:
        """The weighted mean of `values` (weights broadcast to them; None: all 1), as a `Mean`."""
        values = jnp.asarray(values).astype(jnp.float32)
        if weights is None:
            return cls(values.sum(), jnp.asarray(values.size, jnp.float32))
        w = jnp.broadcast_to(jnp.asarray(weights).astype(jnp.float32), values.shape)
        return cls(jnp.sum(values * w), w.sum())

    def value(self) -> Array:
        mean = self.total / jnp.maximum(self.weight, TINY)
        return mean if self.transform is None else self.transform(mean)

    def then(self, transform: Callable) -> Mean:
        """The same mean, reported through `transform` (e.g. `loss.then(jnp.exp)`: the perplexity)."""
        return self.replace(transform=transform)

    def scaled(self, factor: float | Array) -> Mean:
        """`factor` times the mean (the weight unchanged): a term of a weighted sum of losses."""
        return self.replace(total=self.total * factor)


def as_mean(x: Any) -> Mean:
    """`x` if it is a `Mean`, else `Mean(x, 1)`: one equally weighted shard."""
    if isinstance(x, Mean):
        return x
    x = jnp.asarray(x)
    return Mean(x, jnp.ones((), x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32))


def parts(x: Any) -> tuple[Mean, ...]:
    """A loss or metric as the `Mean`s whose values add up to it: a scalar, a `Mean`, or a tuple of them."""
    return tuple(as_mean(p) for p in (x if isinstance(x, (tuple, list)) else (x,)))


def reduce_over(metrics: dict[str, Any], axis_name: str | None) -> dict[str, tuple[Mean, ...]]:
    """Every metric as its `Mean` parts summed over the mapped axis `axis_name` (None: the batch is global)."""
    out = {k: parts(v) for k, v in metrics.items()}
    return out if axis_name is None else jax.lax.psum(out, axis_name)


def value(x: Any) -> Array:
    """A metric's value: its `Mean` parts divided out and added; a plain scalar as it is."""
    if not isinstance(x, (Mean, tuple, list)):
        return x
    return sum(p.value() for p in parts(x))


def values(metrics: dict[str, Any]) -> dict[str, Array]:
    return {k: value(v) for k, v in metrics.items()}


class Accumulator:
    """Adds metrics of several batches on the host (totals and weights separately); `result()` divides."""

    def __init__(self) -> None:
        self.sums: dict[str, list[list[Any]]] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for k, ps in jax.device_get({k: parts(v) for k, v in metrics.items()}).items():
            old = self.sums.setdefault(k, [[0.0, 0.0, p.transform] for p in ps])
            for acc, p in zip(old, ps, strict=True):  # float64 on the host: many batches
                acc[0] += np.float64(p.total)
                acc[1] += np.float64(p.weight)

    def result(self) -> dict[str, float]:
        out = {}
        for k, ps in self.sums.items():
            total = 0.0
            for t, w, transform in ps:
                mean = t / max(w, TINY)
                total += float(mean if transform is None else transform(np.float32(mean)))
            out[k] = total
        return out


def accumulate(batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The metrics of all `batches` reduced as one: sums over sums."""
    acc = Accumulator()
    for m in batches:
        acc.add(m)
    return acc.result()


__all__ = ["Accumulator", "Mean", "accumulate", "as_mean", "parts", "reduce_over", "value", "values"]
