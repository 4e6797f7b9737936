"""One switch for data parallelism: `parallel` = "none" | "pmap" | "jit".

- "none": `jax.jit` on one device.
- "pmap": `jax.pmap` over the local devices; the global batch is split into `[devices, B / devices, ...]` and the
  step averages gradients with `pmean` (`make_train_step(axis_name=...)`); the state is replicated with a leading
  device axis on device and handed back without it by `unreplicate`.
- "jit": `jax.jit` over a `Mesh` with one "data" axis: the batch is sharded along its first dimension
  (`NamedSharding(mesh, P("data"))`), the state replicated; XLA inserts the gradient all-reduce.

The global batch and the results are the same in every mode up to float reassociation (the loss must be a mean
over equally sized shards, as the built-in losses are).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqjax.training.state import TrainState, make_eval_step, make_train_step

MODES = ("none", "pmap", "jit")
AXIS = "batch"  # pmap's axis name


class Parallel:
    """Places state and batches for one mode and compiles the steps for it."""

    def __init__(self, mode: str, devices: Sequence[jax.Device] | None = None):
        if mode not in MODES:
            raise ValueError(f"config.parallel={mode!r} is unknown; use one of {MODES}")
        self.mode = mode
        self.devices = list(devices or (jax.local_devices() if mode == "pmap" else jax.devices()))
        if mode == "none":
            self.devices = self.devices[:1]
        self.mesh = Mesh(np.array(self.devices), ("data",)) if mode == "jit" else None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.num_devices:
            raise ValueError(
                f"config.batch_size={batch_size} must be divisible by the {self.num_devices} devices of "
                f"parallel={self.mode!r}"
            )

    # -- placement ---------------------------------------------------------------------------------------------

    def put_state(self, state: TrainState) -> TrainState:
        if self.mode == "pmap":
            n = self.num_devices  # a leading device axis, one copy on each device (the layout pmap expects)
            sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), P(AXIS))
            return jax.tree.map(
                lambda x: jax.device_put(jnp.broadcast_to(x[None], (n, *jnp.shape(x))), sharding), state
            )
        # Fresh buffers: the compiled steps donate their input state, which must not consume the caller's arrays.
        state = jax.tree.map(jnp.copy, state)
        if self.mode == "jit":
            return jax.device_put(state, NamedSharding(self.mesh, P()))
        return jax.device_put(state, self.devices[0])

    def get_state(self, state: Any) -> Any:
        """The state (or any part of it) as one copy: device 0's under pmap."""
        return jax.tree.map(lambda x: x[0], state) if self.mode == "pmap" else state

    def put_batch(self, batch: Any) -> Any:
        if self.mode == "pmap":
            n = self.num_devices
            return jax.tree.map(lambda x: np.asarray(x).reshape(n, -1, *np.shape(x)[1:]), batch)
        if self.mode == "jit":
            return jax.device_put(batch, NamedSharding(self.mesh, P("data")))
        return batch

    # -- compiled steps ----------------------------------------------------------------------------------------

    def train_step(self, loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
        """Compiled `(state, batch) -> (state, metrics)`; the input state is donated."""
        if self.mode == "pmap":
            step = make_train_step(loss_fn, tx, axis_name=AXIS)
            pmapped = jax.pmap(step, axis_name=AXIS, donate_argnums=0, devices=self.devices)
            return lambda state, batch: _first_of_metrics(pmapped(state, batch))
        step = make_train_step(loss_fn, tx)
        if self.mode == "jit":
            replicated, sharded = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
            return jax.jit(step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                           donate_argnums=0)  # fmt: skip
        return jax.jit(step, donate_argnums=0)

    def eval_step(self, metric_fn: Callable) -> Callable:
        if self.mode == "pmap":
            pmapped = jax.pmap(make_eval_step(metric_fn, axis_name=AXIS), axis_name=AXIS, devices=self.devices)
            return lambda state, batch: jax.tree.map(lambda x: x[0], pmapped(state, batch))
        return jax.jit(make_eval_step(metric_fn))


def _first_of_metrics(out):
    state, metrics = out
    return state, jax.tree.map(lambda x: x[0], metrics)  # identical on every device after pmean


def replicate_check(state: TrainState) -> bool:
    """Under pmap: whether every device holds the same parameters (a cheap consistency check for tests)."""
    leaves = jax.tree.leaves(state.params)
    return all(bool(jnp.all(x == x[0:1])) for x in leaves)
