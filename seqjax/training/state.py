"""The training state and the pure step builders the loop calls.

`TrainState` holds everything a resumed run needs besides the data position: step, parameters, optimizer state,
the run's PRNG key and any mutable model state (batch statistics, a VQ codebook). Per-step randomness is
`fold_in(state.rng, state.step)`, so a resumed run draws the same keys as an uninterrupted one.

Glossary: a loss function is `loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`;
a metric function is `metric_fn(params, model_state, batch) -> metrics`. Losses and metrics are scalars or, for
weighted quantities (token losses over padded batches), `seqjax.training.metrics.Mean`s, which the steps reduce as a
sum over the global batch divided by the global weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.training.metrics import TINY, Mean, parts, reduce_over, values

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
    """`ema_params`: the exponential moving average of the parameters (`make_train_step(ema_decay=...)`), or None
    (off: no leaves, so the checkpoint is the same as without the field)."""

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    model_state: Any = flax.struct.field(default_factory=dict)
    ema_params: Any = None

    @classmethod
    def create(
        cls, params: Any, tx: optax.GradientTransformation, rng: Array, model_state: Any = None, *, ema: bool = False
    ) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            model_state={} if model_state is None else model_state,
            ema_params=jax.tree.map(jnp.copy, params) if ema else None,  # starts at the initial parameters
        )

    def evaluated(self) -> dict[str, TrainState]:
        """The states to evaluate, by metric prefix: "eval_" (the parameters) and, when kept, "eval_ema_"."""
        return {"eval_": self} if self.ema_params is None else {"eval_": self, "eval_ema_": self.with_ema_params()}

    def reported(self) -> TrainState:
        """The state whose parameters make the final report (samples, decoding): the EMA ones when kept."""
        return self if self.ema_params is None else self.with_ema_params()

    def with_ema_params(self) -> TrainState:
        """The state with the EMA parameters in place of the raw ones (to evaluate or sample with them)."""
        if self.ema_params is None:
            raise ValueError("this state keeps no EMA parameters (make_train_step(ema_decay=...) > 0 keeps them)")
        return self.replace(params=self.ema_params)


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
    """`train_step(state, batch) -> (state, metrics)`, pure.

    The loss is a plain scalar (a mean over an equally sized shard), a `Mean` (a weighted sum and its weight,
    `seqjax.training.metrics`), or a tuple of them whose values add up (e.g. a text and an image loss, each averaged
    over its own tokens). Each `Mean` is divided by the weight of the whole batch: with `axis_name` (under
    `jax.pmap`), the weights are summed over that axis first and each device's share of the loss and of the
    gradients is summed after, so a device holding fewer real tokens weighs less, exactly as in one device's global
    batch. Metrics are reduced the same way (`Mean`s sum, plain scalars average); the model state (batch statistics,
    a codebook) is averaged over the axis.

    `grad_accum_steps=K` (> 1) splits each device's batch into K micro-batches (rows k, k+K, k+2K, ...: under
    sharding each micro-batch stays spread over the devices) and runs them one after another in a `lax.scan`, keeping
    each loss term's total, weight and gradient summed; the optimizer steps once with the sum of totals divided by the
    sum of weights: the update of one step on the whole batch (up to float rounding), with the activations of one
    micro-batch alive at a time. Micro-batch k draws its dropout from `fold_in(key, k)`; the model state is threaded
    through the micro-batches in order.

    `ema_decay=d` (in (0, 1); 0: off) updates `state.ema_params` after each optimizer step: `ema = d * ema + (1 - d)
    * params` (the state must be created with `ema=True`)."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {ema_decay!r}")
    if not isinstance(grad_accum_steps, int) or isinstance(grad_accum_steps, bool) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")

    def objective(params, model_state, batch, rng):
        loss, (metrics, model_state) = loss_fn(params, model_state, batch, rng)
        terms = parts(loss)
        weights = [jax.lax.stop_gradient(p.weight).astype(jnp.float32) for p in terms]
        if axis_name is not None:
            weights = jax.lax.psum(weights, axis_name)
        share = sum(p.total.astype(jnp.float32) / jnp.maximum(w, TINY) for p, w in zip(terms, weights, strict=True))
        return share, (metrics, model_state)  # this device's share of the global batch's loss

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:  # each device its own dropout stream
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if grad_accum_steps == 1:
            grad_fn = jax.value_and_grad(objective, has_aux=True)
            (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
            metrics = reduce_over(metrics, axis_name)
        else:
            loss, grads, metrics, model_state = accumulate(state.params, state.model_state, batch, rng)
        if axis_name is not None:
            loss, grads = jax.lax.psum((loss, grads), axis_name)
            model_state = jax.lax.pmean(model_state, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        if ema_decay:
            if state.ema_params is None:
                raise ValueError("ema_decay > 0 needs a state created with TrainState.create(..., ema=True)")
            average = lambda e, p: (ema_decay * e + (1.0 - ema_decay) * p).astype(e.dtype)
            new = new.replace(ema_params=jax.tree.map(average, state.ema_params, params))
        return new, {**values(metrics), "train_loss": loss, "grad_norm": optax.tree.norm(grads)}

    def terms(params, model_state, batch, rng):
        """The loss terms' totals `[n]` (differentiated), their weights `[n]`, the metrics as `Mean` parts and the
        new model state, for one micro-batch."""
        loss, (metrics, model_state) = loss_fn(params, model_state, batch, rng)
        totals = jnp.stack([p.total.astype(jnp.float32) for p in parts(loss)])
        weights = jnp.stack([jax.lax.stop_gradient(p.weight).astype(jnp.float32) for p in parts(loss)])
        return totals, (weights, reduce_over(metrics, None), model_state)

    def accumulate(params, model_state, batch, rng):
        k = grad_accum_steps
        rows = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
        if any(r % k for r in rows):
            raise ValueError(f"grad_accum_steps={k} must divide the batch rows of each device, got {sorted(rows)}")
        # Micro-batch j holds rows j, j + k, ...: a split of the leading axis that keeps its sharding.
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)
        first = jax.tree.map(lambda x: x[0], micro)
        totals, (weights, metrics, _) = jax.eval_shape(terms, params, model_state, first, rng)
        n = totals.shape[0]
        zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
        grads0 = [zeros(params) for _ in range(n)]

        def body(carry, inputs):
            model_state, totals_sum, weights_sum, grads_sum, metrics_sum = carry
            j, mb = inputs
            f = lambda p: terms(p, model_state, mb, jax.random.fold_in(rng, j))
            totals, pullback, (weights, metrics, model_state) = jax.vjp(f, params, has_aux=True)
            # One forward pass; one backward pass per loss term (each is divided by its own total weight below).
            grads = [pullback(jax.nn.one_hot(i, n, dtype=totals.dtype))[0] for i in range(n)]
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            metrics_sum = jax.tree.map(jnp.add, metrics_sum, metrics)
            return (model_state, totals_sum + totals, weights_sum + weights, grads_sum, metrics_sum), None

        carry = (model_state, jnp.zeros(n), jnp.zeros(n), grads0, zeros(metrics))
        carry, _ = jax.lax.scan(body, carry, (jnp.arange(k), micro))
        model_state, totals, weights, grads, metrics = carry
        if axis_name is not None:
            weights = jax.lax.psum(weights, axis_name)
            metrics = jax.lax.psum(metrics, axis_name)
        scale = 1.0 / jnp.maximum(weights, TINY)
        loss = jnp.sum(totals * scale)  # this device's share of the global batch's loss
        grads = jax.tree.map(lambda *g: sum(gi * scale[i].astype(gi.dtype) for i, gi in enumerate(g)), *grads)
        return loss, grads, metrics, model_state

    return train_step


def make_eval_step(metric_fn: Callable, *, axis_name: str | None = None) -> Callable[[TrainState, Any], dict]:
    """`eval_step(state, batch) -> metrics`, each as its `Mean` parts (summed over `axis_name` under `jax.pmap`):
    the loop adds them over the evaluation batches before dividing (`seqjax.training.metrics.Accumulator`)."""

    def eval_step(state: TrainState, batch: Any) -> dict[str, tuple[Mean, ...]]:
        return reduce_over(metric_fn(state.params, state.model_state, batch), axis_name)

    return eval_step
