"""The training state and the pure step builders the loop calls.

`TrainState` holds everything a resumed run needs besides the data position: step, parameters, optimizer state,
the run's PRNG key and any mutable model state (batch statistics, a VQ codebook). Per-step randomness is
`fold_in(state.rng, state.step)`, so a resumed run draws the same keys as an uninterrupted one.

Glossary: a loss function is `loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`;
a metric function is `metric_fn(params, model_state, batch) -> metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
    step: Array
    params: Any
    opt_state: Any
    rng: Array
    model_state: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: Array, model_state: Any = None) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            model_state={} if model_state is None else model_state,
        )


def make_train_step(
    loss_fn: Callable, tx: optax.GradientTransformation, *, axis_name: str | None = None
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
    """`train_step(state, batch) -> (state, metrics)`, pure. With `axis_name` (under `jax.pmap`), gradients, the
    loss, the metrics and the new model state are averaged over that axis; otherwise the batch is global."""

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:  # each device its own dropout stream
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
        if axis_name is not None:
            grads, loss, metrics, model_state = jax.lax.pmean((grads, loss, metrics, model_state), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            model_state=model_state,
        )
        return new, {**metrics, "train_loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(metric_fn: Callable, *, axis_name: str | None = None) -> Callable[[TrainState, Any], dict]:
    """`eval_step(state, batch) -> metrics` (averaged over `axis_name` under `jax.pmap`)."""

    def eval_step(state: TrainState, batch: Any) -> dict[str, Array]:
        metrics = metric_fn(state.params, state.model_state, batch)
        return metrics if axis_name is None else jax.lax.pmean(metrics, axis_name)

    return eval_step
