"""Optimizers from config: optax chains with a schedule, clipping and weight decay masks.

The learning rate lives in the optimizer state (`optax.inject_hyperparams`), so `learning_rate(opt_state)` reads the
value the latest update used, and a sweep can change it without rebuilding the optimizer.

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
  b1, b2: the moments' decay rates (adam, adamw, lion); momentum: sgd's (default 0.9; 0 disables).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "linear", "rsqrt")


def _get(config: Any, key: str, default: Any) -> Any:
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def make_schedule(config: Any) -> optax.Schedule:
    """Warm-up then the chosen decay, as a function of the step."""
    peak = float(_get(config, "learning_rate", None))
    kind = _get(config, "schedule", "constant")
    warmup = int(_get(config, "warmup_steps", 0))
    total = int(_get(config, "num_train_steps", 1))
    end = peak * float(_get(config, "end_learning_rate_factor", 0.0))
    if kind not in SCHEDULES:
        raise ValueError(f"config.schedule={kind!r} is unknown; use one of {SCHEDULES}")
    if warmup < 0 or (kind in ("cosine", "linear") and total <= warmup):
        raise ValueError(f"config.warmup_steps={warmup} must be >= 0 and below config.num_train_steps={total}")
    decay_steps = max(total - warmup, 1)
    if kind == "constant":
        after = optax.constant_schedule(peak)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:  # rsqrt: peak * sqrt(warmup / step) after warm-up (Vaswani et al.)
        scale = max(warmup, 1)
        after = lambda count: peak * jax.lax.rsqrt((jnp.asarray(count, jnp.float32) + scale) / scale)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: those with two or more dimensions (kernels, embeddings)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """The optax chain the config describes (see the module docstring)."""
    name = _get(config, "optimizer", "adam")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer={name!r} is unknown; use one of {OPTIMIZERS}")
    lr = _get(config, "learning_rate", None)
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"config.learning_rate must be a number >= 0, got {lr!r}")
    wd = float(_get(config, "weight_decay", 0.0))
    b1, b2 = float(_get(config, "b1", 0.9)), float(_get(config, "b2", 0.999))
    clip = _get(config, "grad_clip_norm", None)
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise ValueError(f"config.grad_clip_norm must be a number >= 0 (0 or None: no clipping), got {clip!r}")

    def build(learning_rate):
        if name == "adam":
            core = optax.adam(learning_rate, b1=b1, b2=b2)
        elif name == "adamw":
            core = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=wd, mask=decay_mask)
        elif name == "lion":
            core = optax.lion(
                learning_rate, b1=b1, b2=float(_get(config, "b2", 0.99)), weight_decay=wd, mask=decay_mask
            )
        else:
            momentum = float(_get(config, "momentum", 0.9)) or None
            core = optax.sgd(learning_rate, momentum=momentum)
            if wd:
                core = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), core)
        # 0 means no clipping (clipping to norm 0 would zero every update).
        return optax.chain(optax.clip_by_global_norm(float(clip)), core) if clip else core

    return optax.inject_hyperparams(build)(learning_rate=make_schedule(config))


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the latest update used (`optax.inject_hyperparams` records it; right after `init`, the
    first step's)."""
    return opt_state.hyperparams["learning_rate"]
