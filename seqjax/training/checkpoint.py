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


def _scalar_groups(leaves: list[Any]) -> dict[str, list[int]]:
    """Indices of the 0-d numeric leaves, by dtype name (typed PRNG keys stay arrays of their own)."""
    groups: dict[str, list[int]] = {}
    for i, x in enumerate(leaves):
        if np.ndim(x) == 0 and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            groups.setdefault(np.dtype(x.dtype).name, []).append(i)
    return groups


def _scalar_paths(tree: Any) -> dict[str, list[str]]:
    """The tree paths of the packed scalars, in their order in each vector (saved beside them, checked on restore)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    return {dt: [jax.tree_util.keystr(paths[i]) for i in idx] for dt, idx in _scalar_groups(list(leaves)).items()}


def _pack(tree: Any, read: bool = True) -> dict[str, Any]:
    """{"arrays": {path: leaf} for the other leaves, "scalars": {dtype: vector of the 0-d leaves}}.

    The scalars are read to the host (they are replicated under every parallel mode); `read=False` (for an abstract
    tree) gives zero vectors of their size instead."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    groups = _scalar_groups(list(leaves))
    packed = {i for idx in groups.values() for i in idx}
    arrays = {jax.tree_util.keystr(p): x for i, (p, x) in enumerate(zip(paths, leaves, strict=True)) if i not in packed}
    scalars = {
        dt: np.array([np.asarray(leaves[i]) for i in idx] if read else np.zeros(len(idx)), dtype=dt)
        for dt, idx in groups.items()
    }
    return {"arrays": arrays, "scalars": scalars}


def _unpack(packed: dict[str, Any], like: Any, shardings: Any) -> Any:
    """The tree of `like` from `_pack`'s layout; the scalars are placed as `shardings` says (a tree like `like`'s),
    or else like `like`'s leaves."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(like)[0], strict=True)
    placement = jax.tree.leaves(shardings) if shardings is not None else [getattr(x, "sharding", None) for x in leaves]
    out = [packed["arrays"].get(jax.tree_util.keystr(p)) for p in paths]
    for dt, idx in _scalar_groups(list(leaves)).items():
        vector = np.asarray(packed["scalars"][dt])
        for k, i in enumerate(idx):
            value = vector[k]
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
        state = _to_disk(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(_pack(state)))
        self.manager.save(
            step,
            args=args,
            metrics=metrics if self.best_metric is not None else None,
            custom_metadata={"meta": meta, "scalar_paths": _scalar_paths(state)},
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
            stored, expected = custom.get("scalar_paths"), _scalar_paths(template)
            if stored != expected:  # the vectors hold no names: a different set would land on the wrong leaves
                raise ValueError(
                    f"checkpoint step {step} in {self.manager.directory} holds the scalars {stored}, but the state "
                    f"to restore has {expected}"
                )
            packed = _pack(abstract, read=False)  # the scalars come back as numpy vectors
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(packed)))
            state = _unpack(restored["state"], template, shardings)
            meta = custom.get("meta", {})
        return state.replace(rng=jax.random.wrap_key_data(state.rng)), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
