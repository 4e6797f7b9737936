"""Orbax checkpoints of a `TrainState`, with the config and the data position beside it.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it when the save is
finished), so a run killed mid-write resumes from the last finished checkpoint. States are saved as one
unreplicated copy with the PRNG key as raw key data, so a checkpoint written under any parallel mode or device count
restores under any other.

On disk a step holds one Orbax item, in one of two layouts:

- "state_file", for a state of at most `single_file_bytes` (16 MB by default) in a single-process run: every leaf in
  one file, `state.bin`, with an index (`index.json`: tree path, dtype, shape and offset of each leaf). Orbax's array
  format costs about a millisecond of CPU per array on top of a fixed cost; a small model's state with the optimizer's
  injected hyperparameters has twenty or more, and a save every hundred steps of a 2 ms step then costs more than the
  steps themselves would let pass (measured in BENCHMARKS.md). The file is still written by Orbax's CheckpointManager
  (asynchronously, into a temporary directory renamed when finished; max_to_keep and keep-best as for any item).
- "state", for larger states or several processes: the state's arrays under their tree paths in Orbax's array format
  (each process writing its own shards), except that its 0-d leaves (the step, the optimizer's count and its injected
  hyperparameters) are packed into one vector per dtype ("scalars/float32", ...).

The run's metadata (the config, the step) is the step's Orbax `custom_metadata`. Checkpoints of the earlier layout
(every leaf its own array, the metadata a "meta" JSON item) still restore.
"""

from __future__ import annotations

import dataclasses
import json
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
    placement = _placement(leaves, shardings)
    out = [packed["arrays"].get(n) for n in names]  # None for the scalars, filled in below
    for dt, idx in groups.items():
        for value, i in zip(np.asarray(packed["scalars"][dt]), idx, strict=True):
            out[i] = value if placement[i] is None else _place(value, placement[i])
    return jax.tree.unflatten(jax.tree.structure(like), out)


def _placement(leaves: list[Any], shardings: Any) -> list[Any]:
    """Where each leaf goes on restore: as `shardings` says (a tree like the leaves'), or else like the template's
    leaves (None for host values), as Orbax does."""
    return jax.tree.leaves(shardings) if shardings is not None else [getattr(x, "sharding", None) for x in leaves]


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


_ALIGN = 64  # byte alignment of each leaf in state.bin


class SingleFileHandler(ocp.AsyncCheckpointHandler):
    """An Orbax handler for a flat {name: array} dict as one binary file plus a JSON index. The arrays are read to
    the host before `async_save` returns (the caller's buffers may be donated to the next step); the files are
    written in Orbax's background commit."""

    @staticmethod
    def _write(directory: Any, arrays: dict[str, np.ndarray]) -> None:
        index, offset = [], 0
        with open(os.path.join(directory, "state.bin"), "wb") as f:
            for name, x in arrays.items():
                pad = -offset % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                index.append({"name": name, "dtype": x.dtype.name, "shape": list(x.shape), "offset": offset})
                f.write(np.ascontiguousarray(x).tobytes())  # ml_dtypes (bfloat16, ...) included: raw bytes
                offset += x.nbytes
        with open(os.path.join(directory, "index.json"), "w") as f:
            json.dump(index, f)

    async def async_save(self, directory: Any, args: SingleFileSave) -> list[Any]:
        arrays = _host_copies(args.item)

        async def write() -> None:
            self._write(directory, arrays)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="single_file_save")]

    def save(self, directory: Any, args: SingleFileSave) -> None:
        self._write(directory, _host_copies(args.item))

    def restore(self, directory: Any, args: SingleFileRestore | None = None) -> dict[str, np.ndarray]:
        """{name: array}; the arrays are views into the one buffer the file was read into."""
        with open(os.path.join(directory, "index.json")) as f:
            index = json.load(f)
        blob = np.fromfile(os.path.join(directory, "state.bin"), dtype=np.uint8)
        out = {}
        for e in index:
            dtype = np.dtype(jax.numpy.dtype(e["dtype"]))
            n = int(np.prod(e["shape"], dtype=np.int64)) * dtype.itemsize
            if e["offset"] + n > blob.size:
                raise ValueError(f"{directory}/state.bin holds {blob.size} bytes, too few for {e['name']} (index.json)")
            out[e["name"]] = blob[e["offset"] : e["offset"] + n].view(dtype).reshape(e["shape"])
        return out


@ocp.args.register_with_handler(SingleFileHandler, for_save=True)
@dataclasses.dataclass
class SingleFileSave(ocp.args.CheckpointArgs):
    item: dict[str, Any]


@ocp.args.register_with_handler(SingleFileHandler, for_restore=True)
@dataclasses.dataclass
class SingleFileRestore(ocp.args.CheckpointArgs):
    pass


def _host_copies(item: dict[str, Any]) -> dict[str, np.ndarray]:
    """Host copies of the arrays, owned (on CPU `device_get` may hand back views of the device buffers, which the next
    train step may reuse)."""
    return {k: np.array(v, copy=True) for k, v in jax.device_get(item).items()}


def _single_file(leaves: list[Any], limit: int) -> bool:
    """Whether a state with these leaves is saved as one file: one process, every leaf a fully addressable array of
    a numpy dtype (typed PRNG keys other than the state's own go to Orbax's format), at most `limit` bytes."""
    return (
        jax.process_count() == 1
        and all(not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended) for x in leaves)
        and all(getattr(x, "is_fully_addressable", True) for x in leaves)
        and sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x))) for x in leaves) <= limit
    )


class Checkpointer:
    """`save(state, meta)`, `restore(template) -> (state, meta) | None`, over `WORKDIR/checkpoints`.

    Args:
      directory: where the step directories go.
      max_to_keep: newest checkpoints kept (None: all).
      best_metric: keep-best: checkpoints also carry metrics; with `max_to_keep`, the best ones by this metric are
        kept instead of the newest (`best_mode` "min" or "max").
      single_file_bytes: states up to this size (single process) are saved as one file (see the module's docstring);
        0 always uses Orbax's array format.
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 2, best_metric: str | None = None,
                 best_mode: str = "min", single_file_bytes: int = 16 << 20):  # fmt: skip
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=None if best_metric is None else (lambda metrics: float(metrics[best_metric])),
            best_mode=best_mode,
            keep_checkpoints_without_metrics=best_metric is None,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
        )
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
        self.best_metric = best_metric
        self.single_file_bytes = single_file_bytes

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        state = _to_disk(state)
        names, leaves, _ = _flatten(state)
        if _single_file(leaves, self.single_file_bytes):
            args, custom = ocp.args.Composite(state_file=SingleFileSave(dict(zip(names, leaves, strict=True)))), {}
        else:
            packed, scalar_paths = _pack(state)
            args, custom = ocp.args.Composite(state=ocp.args.StandardSave(packed)), {"scalar_paths": scalar_paths}
        self.manager.save(
            step,
            args=args,
            metrics=metrics if self.best_metric is not None else None,
            custom_metadata={"meta": meta, **custom},
        )

    def restore(
        self, template: TrainState, step: int | None = None, shardings: Any = None
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The checkpoint at `step` (default: the latest finished one), shaped like `template` and placed like it
        or as `shardings` says (a tree of shardings like `template`'s: then, in Orbax's array format, each process
        reads only its shards; a single-file checkpoint is read whole); None if there is none. A leaf stored in
        another dtype than the template's is cast to the template's, as Orbax does; other shapes or tree paths are
        refused."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        template = _to_disk(template)
        if os.path.isdir(os.path.join(self.manager.directory, str(step), "state_file")):
            state = self._restore_file(step, template, shardings)
            meta = (self.manager.metadata(step).custom_metadata or {}).get("meta", {})
        else:
            state, meta = self._restore_arrays(step, template, shardings)
        return state.replace(rng=jax.random.wrap_key_data(state.rng)), meta

    def _restore_file(self, step: int, template: Any, shardings: Any) -> Any:
        stored = self.manager.restore(step, args=ocp.args.Composite(state_file=SingleFileRestore()))["state_file"]
        names, leaves, _ = _flatten(template)
        if set(stored) != set(names):
            raise ValueError(
                f"checkpoint step {step} in {self.manager.directory} does not fit the state to restore: it lacks "
                f"{sorted(set(names) - set(stored))} and has {sorted(set(stored) - set(names))} besides"
            )
        out = []
        for name, like, where in zip(names, leaves, _placement(leaves, shardings), strict=True):
            value = stored[name]
            if value.shape != like.shape:
                raise ValueError(
                    f"checkpoint step {step}: {name} has shape {value.shape}, the state to restore {like.shape}"
                )
            out.append(_place(value.astype(like.dtype, copy=False), where))
        return jax.tree.unflatten(jax.tree.structure(template), out)

    def _restore_arrays(self, step: int, template: Any, shardings: Any) -> tuple[Any, dict[str, Any]]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        if shardings is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)  # fmt: skip
        if os.path.isdir(os.path.join(self.manager.directory, str(step), "meta")):  # the earlier layout
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
            return restored["state"], restored["meta"]
        custom = self.manager.metadata(step).custom_metadata or {}
        packed, expected = _pack(abstract, read=False)  # the scalars come back as numpy vectors
        if custom.get("scalar_paths") != expected:  # the vectors hold no names: they would fill the wrong leaves
            raise ValueError(
                f"checkpoint step {step} in {self.manager.directory} holds the scalars "
                f"{custom.get('scalar_paths')}, but the state to restore has {expected}"
            )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(packed)))
        return _unpack(restored["state"], template, shardings), custom.get("meta", {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
