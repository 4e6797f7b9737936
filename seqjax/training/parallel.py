"""One switch for data parallelism: `parallel` = "none" | "pmap" | "jit", and multi-host start-up.

- "none": `jax.jit` on one device.
- "pmap": `jax.pmap` over the local devices; the global batch is split into `[devices, B / devices, ...]` and the
  step averages gradients with `pmean` (`make_train_step(axis_name=...)`); the state is replicated with a leading
  device axis on device and handed back without it by `get_state`.
- "jit": `jax.jit` over a `Mesh` of every device (of every process), shaped `("data", "fsdp")` = (devices / fsdp,
  fsdp). The batch is split along its first dimension over all of them; parameters and optimizer state are
  replicated (`fsdp=1`) or, FSDP-style, each array split over the "fsdp" axis along its largest dimension that
  divides evenly (arrays under `fsdp_min_size` elements stay replicated). XLA inserts the all-gathers and the
  gradient reductions.

The global batch and the results are the same in every mode up to float reassociation: weighted losses and metrics
(`seqjax.training.metrics.Mean`) are summed over the devices before they are divided by the global weight, so padded
batches whose devices hold different numbers of real tokens give one device's numbers too.

Multi-host (`jit` only): `initialize_distributed(config)` calls `jax.distributed.initialize` when the environment
says the run is one of several processes (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a
SLURM / Open MPI job of several tasks, which JAX detects) or when `config.distributed` is true. Each process then
hands over only its own rows of the global batch (`put_batch` slices them out of the batch it is given).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqjax.errors import ConfigError
from seqjax.training.state import TrainState, make_eval_step, make_train_step

MODES = ("none", "pmap", "jit")
AXIS = "batch"  # pmap's axis name
FSDP_MIN_SIZE = 1024


def _env_says_distributed() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        return int(env["JAX_NUM_PROCESSES"]) > 1
    return int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_distributed(config: Any = None) -> bool:
    """`jax.distributed.initialize` once, before any computation, if this run is one of several processes (see the
    module docstring) or `config.distributed` asks; returns whether the run is multi-process."""
    from jax._src import distributed  # the public API has no "is it initialized" query

    if distributed.global_state.client is not None:
        return jax.process_count() > 1
    asked = bool(config is not None and config.get("distributed", False))
    if not (asked or _env_says_distributed()):
        return False
    env = os.environ
    num = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None
    pid = int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None
    jax.distributed.initialize(env.get("JAX_COORDINATOR_ADDRESS"), num, pid)  # None: JAX's cluster detection
    return jax.process_count() > 1


class Parallel:
    """Places state and batches for one mode and compiles the steps for it."""

    def __init__(self, mode: str, devices: Sequence[jax.Device] | None = None, *, fsdp: int = 1,
                 fsdp_min_size: int = FSDP_MIN_SIZE):  # fmt: skip
        if mode not in MODES:
            raise ConfigError("parallel", f"{mode!r} is unknown (one of {', '.join(map(repr, MODES))})")
        self.mode = mode
        self.devices = list(devices or (jax.local_devices() if mode == "pmap" else jax.devices()))
        if mode == "none":
            self.devices = self.devices[:1]
        if mode != "jit" and jax.process_count() > 1:
            raise ConfigError("parallel", f"{mode!r} runs on one process ('jit' for a multi-process run)")
        if fsdp != 1 and mode != "jit":
            raise ConfigError("fsdp", f"{fsdp} needs parallel='jit', not {mode!r} (1, or parallel='jit')")
        if fsdp < 1 or len(self.devices) % fsdp:
            raise ConfigError("fsdp", f"{fsdp} does not divide the {len(self.devices)} devices (a divisor >= 1)")
        self.fsdp, self.fsdp_min_size = fsdp, fsdp_min_size
        self.mesh = None
        if mode == "jit":
            self.mesh = Mesh(np.array(self.devices).reshape(-1, fsdp), ("data", "fsdp"))

    @classmethod
    def from_config(cls, config: Any) -> Parallel:
        return cls(config.parallel, fsdp=config.get("fsdp", 1), fsdp_min_size=config.get("fsdp_min_size",
                   FSDP_MIN_SIZE))  # fmt: skip

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def check_batch_size(self, batch_size: int, grad_accum_steps: int = 1) -> None:
        if batch_size % self.num_devices:
            raise ConfigError(
                "batch_size",
                f"{batch_size} is not divisible by the {self.num_devices} devices of parallel={self.mode!r} "
                f"(a multiple of {self.num_devices})",
            )
        if (batch_size // self.num_devices) % grad_accum_steps:
            raise ConfigError(
                "grad_accum_steps",
                f"{grad_accum_steps} does not divide the {batch_size // self.num_devices} rows of each of the "
                f"{self.num_devices} devices (batch_size {batch_size}); each micro-batch needs equal rows",
            )

    # -- placement ---------------------------------------------------------------------------------------------

    def _leaf_spec(self, shape: tuple[int, ...]) -> P:
        """Replicated, or (fsdp > 1) split over "fsdp" along the largest dimension that divides evenly."""
        if self.fsdp == 1 or math.prod(shape) < self.fsdp_min_size:
            return P()
        dims = [d for d in range(len(shape)) if shape[d] % self.fsdp == 0]
        if not dims:
            return P()
        d = max(dims, key=lambda i: shape[i])
        return P(*([None] * d), "fsdp")

    def state_shardings(self, state: Any) -> Any:
        """Under "jit": the `NamedSharding` of every leaf of `state` (which may be abstract); else None."""
        if self.mode != "jit":
            return None
        return jax.tree.map(lambda x: NamedSharding(self.mesh, self._leaf_spec(np.shape(x))), state)

    def put_state(self, state: TrainState) -> TrainState:
        """A host state (every process holding the same values) placed for this mode, in fresh buffers."""
        if self.mode == "pmap":
            n = self.num_devices  # a leading device axis, one copy on each device (the layout pmap expects)
            sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), P(AXIS))
            return jax.tree.map(
                lambda x: jax.device_put(jnp.broadcast_to(x[None], (n, *jnp.shape(x))), sharding), state
            )
        if self.mode == "jit":  # built from each process's own copy: works across processes
            return jax.tree.map(place, state, self.state_shardings(state))
        # Fresh buffers: the compiled steps donate their input state, which must not consume the caller's arrays.
        return jax.device_put(jax.tree.map(jnp.copy, state), self.devices[0])

    def get_state(self, state: Any) -> Any:
        """The state (or any part of it) as one copy: device 0's under pmap; the global arrays under jit."""
        return jax.tree.map(lambda x: x[0], state) if self.mode == "pmap" else state

    def to_host(self, tree: Any) -> Any:
        """Whole numpy values of a placed tree, on every process (gathers arrays split across processes)."""
        tree = self.get_state(tree)
        if self.mode == "jit" and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            keys = jax.tree.map(lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key), tree)
            raw = jax.tree.map(lambda x, k: jax.random.key_data(x) if k else x, tree, keys)
            return multihost_utils.process_allgather(raw, tiled=True)
        return jax.device_get(tree)

    def put_batch(self, batch: Any, *, local: bool = False) -> Any:
        """The global batch placed for this mode. Several processes: each hands over the global batch, from which
        its rows are cut, or (`local=True`) only its own rows (`Pipeline.process_batch`)."""
        if self.mode == "pmap":
            n = self.num_devices
            return jax.tree.map(lambda x: np.asarray(x).reshape(n, -1, *np.shape(x)[1:]), batch)
        if self.mode == "jit":
            sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
            if jax.process_count() == 1:
                return jax.device_put(batch, sharding)
            i, n = jax.process_index(), jax.process_count()

            def put(x):
                x = np.asarray(x)
                rows = x if local else x[i * len(x) // n : (i + 1) * len(x) // n]
                return jax.make_array_from_process_local_data(sharding, rows, (len(rows) * n, *x.shape[1:]))

            return jax.tree.map(put, batch)
        return batch

    # -- compiled steps ----------------------------------------------------------------------------------------

    def train_step(
        self, loss_fn: Callable, tx: optax.GradientTransformation, state: Any = None, **options: Any
    ) -> Callable:
        """Compiled `(state, batch) -> (state, metrics)`; the input state is donated. Under "jit", `state` (a
        template, possibly abstract) fixes the state's shardings on the way in and out. `options` go to
        `make_train_step` (e.g. `grad_accum_steps`)."""
        if self.mode == "pmap":
            step = make_train_step(loss_fn, tx, axis_name=AXIS, **options)
            pmapped = jax.pmap(step, axis_name=AXIS, donate_argnums=0, devices=self.devices)
            return lambda state, batch: _first_of_metrics(pmapped(state, batch))
        step = make_train_step(loss_fn, tx, **options)
        if self.mode == "jit":
            replicated = NamedSharding(self.mesh, P())
            if state is None:
                return jax.jit(step, out_shardings=(None, replicated), donate_argnums=0)
            shardings = self.state_shardings(state)
            return jax.jit(step, in_shardings=(shardings, NamedSharding(self.mesh, P(("data", "fsdp")))),
                           out_shardings=(shardings, replicated), donate_argnums=0)  # fmt: skip
        return jax.jit(step, donate_argnums=0)

    def eval_step(self, metric_fn: Callable) -> Callable:
        if self.mode == "pmap":
            pmapped = jax.pmap(make_eval_step(metric_fn, axis_name=AXIS), axis_name=AXIS, devices=self.devices)
            return lambda state, batch: jax.tree.map(lambda x: x[0], pmapped(state, batch))
        if self.mode == "jit":
            return jax.jit(make_eval_step(metric_fn), out_shardings=NamedSharding(self.mesh, P()))
        return jax.jit(make_eval_step(metric_fn))


def place(x: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """`x` (a host value, or an array every process holds whole; PRNG keys too) as an array laid out as `sharding`
    says, each process supplying its own shards (so it works across processes); None: on the default device."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if sharding is None:
        return jnp.asarray(x)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _first_of_metrics(out):
    state, metrics = out
    return state, jax.tree.map(lambda x: x[0], metrics)  # identical on every device after pmean


def replicate_check(state: TrainState) -> bool:
    """Under pmap: whether every device holds the same parameters (a cheap consistency check for tests)."""
    leaves = jax.tree.leaves(state.params)
    return all(bool(jnp.all(x == x[0:1])) for x in leaves)
