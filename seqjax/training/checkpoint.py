"""Orbax checkpoints of a `TrainState`, with the config and the data position beside it.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it when the save is
finished), so a run killed mid-write resumes from the last finished checkpoint. States are saved as one
unreplicated copy with the PRNG key as raw key data, so a checkpoint written under any parallel mode or device count
restores under any other.

On disk a step holds one Orbax item, "state": the state's arrays under their tree paths, except that its 0-d leaves
(the step, the optimizer's count and its injected hyperparameters) are packed into one vector per dtype
("scalars/float32", ...), since Orbax's cost per save grows by about a millisecond per array. The run's metadata (the
config, the step) is the step's Orbax `custom_metadata`. Checkpoints of the earlier layout (every leaf its own array,
the metadata a "meta" JSON item) still restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from seqjax.training.state import TrainState


def _to_disk(state: TrainState) -> TrainState:
    return state.replace(rng=jax.random.key_data(state.rng))


def _flatten(tree: Any) -> tuple[list[str], list[Any], dict[str, list[int]]]:
    """Path names and leaves of `tree`, and the indices of its 0-d numeric leaves by dtype name (typed PRNG keys stay
    arrays of their own)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    groups: dict[str, list[int]] = {}
    for i, x in enumerate(leaves):
        if np.ndim(x) == 0 and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            groups.setdefault(np.dtype(x.dtype).name, []).append(i)
    return [jax.tree_util.keystr(p) for p in paths], list(leaves), groups


def _pack(tree: Any, read: bool = True) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """({"arrays": {path: leaf} for the other leaves, "scalars": {dtype: vector of the 0-d leaves}}, the paths of
    the packed scalars in their order in each vector: saved beside them, checked on restore).

    The scalars are read to the host (they are replicated under every parallel mode); `read=False` (for an abstract
    tree) gives zero vectors of their size instead."""
    names, leaves, groups = _flatten(tree)
    packed = {i for idx in groups.values() for i in idx}
    arrays = {name: x for i, (name, x) in enumerate(zip(names, leaves, strict=True)) if i not in packed}
    scalars = {
        dt: np.array([np.asarray(leaves[i]) for i in idx] if read else np.zeros(len(idx)), dtype=dt)
        for dt, idx in groups.items()
    }
    return {"arrays": arrays, "scalars": scalars}, {dt: [names[i] for i in idx] for dt, idx in groups.items()}


def _unpack(packed: dict[str, Any], like: Any, shardings: Any) -> Any:
    """The tree of `like` from `_pack`'s layout; the scalars are placed as `shardings` says (a tree like `like`'s),
    or else like `like`'s leaves."""
    names, leaves, groups = _flatten(like)
    placement = jax.tree.leaves(shardings) if shardings is not None else [getattr(x, "sharding", None) for x in leaves]
    out = [packed["arrays"].get(n) for n in names]  # None for the scalars, filled in below
    for dt, idx in groups.items():
        for value, i in zip(np.asarray(packed["scalars"][dt]), idx, strict=True):
            out[i] = (
                value if placement[i] is None else jax.make_array_from_callback((), placement[i], lambda _, v=value: v)
            )
    return jax.tree.unflatten(jax.tree.structure(like), out)


class Checkpointer:
    """`save(state, meta)`, `restore(template) -> (state, meta) | None`, over `WORKDIR/checkpoints`.

    Args:
      directory: where the step directories go.
      max_to_keep: newest checkpoints kept (None: all).
      best_metric: keep-best: checkpoints also carry metrics; with `max_to_keep`, the best ones by this metric are
        kept instead of the newest (`best_mode` "min" or "max").
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 2, best_metric: str | None = None,
                 best_mode: str = "min"):  # fmt: skip
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=None if best_metric is None else (lambda metrics: float(metrics[best_metric])),
            best_mode=best_mode,
            keep_checkpoints_without_metrics=best_metric is None,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
        )
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
        self.best_metric = best_metric

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        packed, scalar_paths = _pack(_to_disk(state))
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(packed)),
            metrics=metrics if self.best_metric is not None else None,
            custom_metadata={"meta": meta, "scalar_paths": scalar_paths},
        )

    def restore(
        self, template: TrainState, step: int | None = None, shardings: Any = None
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The checkpoint at `step` (default: the latest finished one), shaped like `template` and placed like it
        or as `shardings` says (a tree of shardings like `template`'s: then each process reads only its shards);
        None if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        template = _to_disk(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        if shardings is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)  # fmt: skip
        if os.path.isdir(os.path.join(self.manager.directory, str(step), "meta")):  # the earlier layout
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
            state, meta = restored["state"], restored["meta"]
        else:
            custom = self.manager.metadata(step).custom_metadata or {}
            packed, expected = _pack(abstract, read=False)  # the scalars come back as numpy vectors
            if custom.get("scalar_paths") != expected:  # the vectors hold no names: they would fill the wrong leaves
                raise ValueError(
                    f"checkpoint step {step} in {self.manager.directory} holds the scalars "
                    f"{custom.get('scalar_paths')}, but the state to restore has {expected}"
                )
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(packed)))
            state = _unpack(restored["state"], template, shardings)
            meta = custom.get("meta", {})
        return state.replace(rng=jax.random.wrap_key_data(state.rng)), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
