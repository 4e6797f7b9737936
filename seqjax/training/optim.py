"""Optimizers from config: optax chains with a schedule, clipping and weight decay masks.

Every numeric hyperparameter lives in the optimizer state (`optax.inject_hyperparams`): the peak learning rate, the
schedule (its kind as a number, warm-up, horizon, end factor), weight decay, the moments' decay rates, momentum and
the clipping norm. So `learning_rate(opt_state)` reads the rate the latest update used, and a vectorised sweep
(`seqjax.training.vectorized`) trains K configurations with one update function by stacking K optimizer states whose
hyperparameters differ. What is not a number (the optimizer's name; whether clipping, momentum or sgd's weight decay
are on) shapes the chain and must agree between stacked states: `optimizer_structure(config)`.

Config fields read (all but `learning_rate` and `num_train_steps` optional):
  optimizer: "adam" | "adamw" | "sgd" | "lion" (default "adam").
  learning_rate: peak learning rate.
  schedule: "constant" | "cosine" | "linear" | "rsqrt" (default "constant"), after `warmup_steps` of linear warm-up.
  warmup_steps: default 0.
  num_train_steps: the schedule's horizon (cosine and linear decay to `end_learning_rate_factor` * peak there).
  end_learning_rate_factor: default 0.0.
  weight_decay: decoupled weight decay (adamw, lion; sgd adds it to the gradient); default 0.0. Applied only to
    parameters with two or more dimensions (kernels, embedding tables), never to biases or LayerNorm scales.
  grad_clip_norm: clip the global gradient norm to this (default None, or 0: no clipping).
  b1, b2: the moments' decay rates (adam, adamw: 0.9, 0.999; lion: 0.9, 0.99); momentum: sgd's (default 0.9; 0
    disables).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.training.parallel import place

OPTIMIZERS = ("adam", "adamw", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "linear", "rsqrt")
# The config keys held as numbers in the optimizer state (a vectorised sweep may vary them between stacked trials).
HYPERPARAMETERS = (
    "learning_rate", "schedule", "warmup_steps", "num_train_steps", "end_learning_rate_factor", "weight_decay", "b1",
    "b2", "momentum", "grad_clip_norm",
)  # fmt: skip


def _get(config: Any, key: str, default: Any) -> Any:
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


# schedule_value's arguments after the step: the schedule's numbers, as they are named in the optimizer state.
SCHEDULE_ARGUMENTS = ("peak_learning_rate", "schedule", "warmup_steps", "num_train_steps", "end_learning_rate_factor")


def schedule_hyperparameters(config: Any) -> dict[str, float]:
    """The schedule's numbers, checked: peak, kind (an index into SCHEDULES), warm-up, horizon, end factor."""
    peak = _get(config, "learning_rate", None)
    if not isinstance(peak, (int, float)) or isinstance(peak, bool) or peak < 0:
        raise ValueError(f"config.learning_rate must be a number >= 0, got {peak!r}")
    kind = _get(config, "schedule", "constant")
    warmup = int(_get(config, "warmup_steps", 0))
    total = int(_get(config, "num_train_steps", 1))
    if kind not in SCHEDULES:
        raise ValueError(f"config.schedule={kind!r} is unknown; use one of {SCHEDULES}")
    if warmup < 0 or (kind in ("cosine", "linear") and total <= warmup):
        raise ValueError(f"config.warmup_steps={warmup} must be >= 0 and below config.num_train_steps={total}")
    return {
        "peak_learning_rate": float(peak),
        "schedule": float(SCHEDULES.index(kind)),
        "warmup_steps": float(warmup),
        "num_train_steps": float(total),
        "end_learning_rate_factor": float(_get(config, "end_learning_rate_factor", 0.0)),
    }


def schedule_value(step, peak_learning_rate, schedule, warmup_steps, num_train_steps, end_learning_rate_factor):
    """The learning rate at `step` (traceable in every argument, so stacked trials may differ in any of them):
    linear warm-up from 0 over `warmup_steps`, then the schedule SCHEDULES[schedule]: constant; cosine or linear
    decay to peak * end factor at `num_train_steps`; rsqrt, peak * sqrt(w / (step - w + w)) with w = max(warm-up, 1)
    (Vaswani et al.)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    step, peak, kind, warmup = f32(step), f32(peak_learning_rate), f32(schedule), f32(warmup_steps)
    end = peak * f32(end_learning_rate_factor)
    decay_steps = jnp.maximum(f32(num_train_steps) - warmup, 1.0)
    after = jnp.maximum(step - warmup, 0.0)
    frac = jnp.minimum(after, decay_steps) / decay_steps
    scale = jnp.maximum(warmup, 1.0)
    decayed = jnp.select(
        [kind == 0, kind == 1, kind == 2],
        [peak, end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac)), peak + (end - peak) * frac],
        peak * jax.lax.rsqrt((after + scale) / scale),
    )
    return jnp.where(step < warmup, peak * step / scale, decayed)


def make_schedule(config: Any) -> optax.Schedule:
    """Warm-up then the chosen decay, as a function of the step."""
    hp = schedule_hyperparameters(config)
    return lambda count: schedule_value(count, **hp)


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: those with two or more dimensions (kernels, embeddings)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def optimizer_structure(config: Any) -> tuple:
    """What shapes the optax chain (not numbers in its state): stacked optimizer states must agree on it."""
    name = _get(config, "optimizer", "adam")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer={name!r} is unknown; use one of {OPTIMIZERS}")
    clip = _get(config, "grad_clip_norm", None)
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise ValueError(f"config.grad_clip_norm must be a number >= 0 (0 or None: no clipping), got {clip!r}")
    sgd_momentum = name == "sgd" and bool(float(_get(config, "momentum", 0.9)))
    sgd_decay = name == "sgd" and bool(float(_get(config, "weight_decay", 0.0)))
    return (name, bool(clip), sgd_momentum, sgd_decay)


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """The optax chain the config describes (see the module docstring)."""
    name, clip_on, sgd_momentum, sgd_decay = optimizer_structure(config)

    def build(step, peak_learning_rate, schedule, warmup_steps, num_train_steps, end_learning_rate_factor,
              weight_decay, b1, b2, momentum, grad_clip_norm):  # fmt: skip
        lr = schedule_value(step, peak_learning_rate, schedule, warmup_steps, num_train_steps, end_learning_rate_factor)
        if name == "adam":
            core = optax.adam(lr, b1=b1, b2=b2)
        elif name == "adamw":
            core = optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
        elif name == "lion":
            core = optax.lion(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
        else:
            core = optax.sgd(lr, momentum=momentum if sgd_momentum else None)
            if sgd_decay:
                core = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), core)
        # 0 means no clipping (clipping to norm 0 would zero every update).
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), core) if clip_on else core

    # float32 whatever the parameters' dtype: b2 = 0.999 or a horizon of 100000 steps do not survive bfloat16.
    return optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(
        step=lambda count: count,  # the update's index, so the schedule is a function of numbers in the state
        **schedule_hyperparameters(config),
        weight_decay=float(_get(config, "weight_decay", 0.0)),
        b1=float(_get(config, "b1", 0.9)),
        b2=float(_get(config, "b2", 0.99 if name == "lion" else 0.999)),
        momentum=float(_get(config, "momentum", 0.9)),
        grad_clip_norm=float(_get(config, "grad_clip_norm", None) or 0.0),
    )


def with_hyperparameters_of(opt_state: Any, fresh: Any) -> Any:
    """`opt_state` (restored from a checkpoint) with the hyperparameters of `fresh` (`tx.init` of the current config),
    placed like the restored ones: a resumed run follows its config (a longer horizon, a new learning rate), not the
    numbers saved with the state. The moments and counts are kept."""
    old = opt_state.hyperparams
    new = {}
    for k, v in old.items():
        if k == "step" or k not in fresh.hyperparams:
            new[k] = v
            continue
        value = np.asarray(fresh.hyperparams[k], v.dtype)
        sharding = getattr(v, "sharding", None)
        new[k] = value if sharding is None else place(np.broadcast_to(value, v.shape), sharding)
    return opt_state._replace(hyperparams=new)


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the latest update used (right after `init`, the first step's); stacked states give one
    per trial. Takes the optimizer state or its `hyperparams`. Outside a trace, the numbers are fetched to the host
    first, so nothing is computed on a placed (replicated or sharded) state."""
    hp = getattr(opt_state, "hyperparams", opt_state)
    if not any(isinstance(v, jax.core.Tracer) for v in hp.values()):
        hp = jax.device_get(hp)
    return schedule_value(hp["step"], **{k: hp[k] for k in SCHEDULE_ARGUMENTS})
