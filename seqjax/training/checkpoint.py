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

Integrity (`seqjax.training.checksums`): each item directory gets `checksums.json`, the size and CRC-32 of each of
its files plus the CRC-32 of the step's custom metadata, and `"checksums": 1` in the custom metadata says that the
step must have one. The manifest is written inside Orbax's save, before Orbax renames the temporary directory and
before its max_to_keep deletes older steps: "state_file" writes state.bin while computing its CRC from memory, then
reads both files back and raises if state.bin differs; "state" (ChecksummedArrayHandler) reads its files back in the
handler's `finalize`, after Orbax's OCDBT merge has rewritten them (so there the check is that the write and the
read-back succeeded; the sums guard against later damage). A failed write or read-back fails Orbax's commit: the
step is never finalized, no older step is deleted, and the next `save`, `wait` or `close` raises CheckpointError
naming the step. The work runs on Orbax's background thread, so saves stay asynchronous (for a 16 MB state about
3 ms of CRC from memory and 9 ms to read back and sum). Several processes save no checksums (each writes its own
files).

`restore()` verifies a step before reading it (the metadata must parse and match its CRC, each listed file exist
with its size and CRC); a step of an earlier layout without checksums counts as damaged when it cannot be read.
Without an explicit step, a damaged step is skipped for the next older one and moved to
`checkpoints/damaged/<step>-<reason>` (kept for inspection, out of Orbax's step list, so that the resumed run can
save that step again); `skipped` holds one line per skipped step for the caller to print. When every step is
damaged, CheckpointError lists them all and nothing is moved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from seqjax.training.checksums import CheckpointDamaged, json_crc, read_step_metadata, verify_item, write_manifest
from seqjax.training.parallel import place
from seqjax.training.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint that failed to save, or a directory whose checkpoints are all damaged."""


class CheckpointMismatch(ValueError):
    """An intact checkpoint that does not fit the state to restore (another model or optimizer)."""


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
            out[i] = value if placement[i] is None else place(value, placement[i])
    return jax.tree.unflatten(jax.tree.structure(like), out)


def _placement(leaves: list[Any], shardings: Any) -> list[Any]:
    """Where each leaf goes on restore: as `shardings` says (a tree like the leaves'), or else like the template's
    leaves (None for host values), as Orbax does."""
    return jax.tree.leaves(shardings) if shardings is not None else [getattr(x, "sharding", None) for x in leaves]


_ALIGN = 64  # byte alignment of each leaf in state.bin


class SingleFileHandler(ocp.AsyncCheckpointHandler):
    """An Orbax handler for a flat {name: array} dict as one binary file plus a JSON index. The arrays are read to
    the host before `async_save` returns (the caller's buffers may be donated to the next step); the files are
    written in Orbax's background commit."""

    @staticmethod
    def _write(directory: Any, arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, str]]:
        """Writes the files; returns the size and CRC-32 of state.bin as written from memory."""
        index, offset, crc = [], 0, 0
        with open(os.path.join(directory, "state.bin"), "wb") as f:
            for name, x in arrays.items():
                pad = b"\0" * (-offset % _ALIGN)
                data = np.ascontiguousarray(x).tobytes()  # ml_dtypes (bfloat16, ...) included: raw bytes
                f.write(pad)
                offset += len(pad)
                index.append({"name": name, "dtype": x.dtype.name, "shape": list(x.shape), "offset": offset})
                f.write(data)
                offset += len(data)
                crc = zlib.crc32(data, zlib.crc32(pad, crc))
        with open(os.path.join(directory, "index.json"), "w") as f:
            json.dump(index, f)
        return {"state.bin": (offset, f"{crc & 0xFFFFFFFF:08x}")}

    def _commit(self, directory: Any, arrays: dict[str, np.ndarray], meta_crc: str | None) -> None:
        written = self._write(directory, arrays)
        if meta_crc is not None:  # read back before Orbax finalizes the step and deletes older ones
            write_manifest(os.fspath(directory), meta_crc, expected=written)

    async def async_save(self, directory: Any, args: SingleFileSave) -> list[Any]:
        arrays = _host_copies(args.item)

        async def write() -> None:
            self._commit(directory, arrays, args.meta_crc)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="single_file_save")]

    def save(self, directory: Any, args: SingleFileSave) -> None:
        self._commit(directory, _host_copies(args.item), args.meta_crc)

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
    meta_crc: str | None = None  # the custom metadata's CRC-32, recorded in checksums.json (None: no checksums)


@ocp.args.register_with_handler(SingleFileHandler, for_restore=True)
@dataclasses.dataclass
class SingleFileRestore(ocp.args.CheckpointArgs):
    pass


class ChecksummedArrayHandler(ocp.StandardCheckpointHandler):
    """Orbax's StandardCheckpointHandler, which also writes checksums.json once its files are final (after the OCDBT
    merge in `finalize`, before Orbax renames the step directory)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._meta_crc: str | None = None

    async def async_save(self, directory: Any, args: ArraySave) -> list[Any] | None:  # type: ignore[override]
        self._meta_crc = args.meta_crc
        return await super().async_save(directory, args=ocp.args.StandardSave(args.item))

    def finalize(self, directory: Any) -> None:
        super().finalize(directory)
        if self._meta_crc is not None:
            write_manifest(os.fspath(directory), self._meta_crc)

    def restore(self, directory: Any, args: ArrayRestore | None = None) -> Any:  # type: ignore[override]
        return super().restore(directory, args=ocp.args.StandardRestore(None if args is None else args.item))


@ocp.args.register_with_handler(ChecksummedArrayHandler, for_save=True)
@dataclasses.dataclass
class ArraySave(ocp.args.CheckpointArgs):
    item: Any
    meta_crc: str | None = None


@ocp.args.register_with_handler(ChecksummedArrayHandler, for_restore=True)
@dataclasses.dataclass
class ArrayRestore(ocp.args.CheckpointArgs):
    item: Any = None


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
        self.skipped: list[str] = []  # set by restore(): one line per damaged step it skipped
        self._saving: int | None = None  # the step of the save in flight

    @classmethod
    def from_config(cls, directory: str, config: Any) -> Checkpointer:
        """A run's checkpointer: the config's optional `max_checkpoints_to_keep` (None or missing: this class's
        default) and `keep_best_metric` / `keep_best_mode` (keep-best)."""
        options: dict[str, Any] = {}
        if config.get("max_checkpoints_to_keep") is not None:
            options["max_to_keep"] = config.max_checkpoints_to_keep
        if config.get("keep_best_metric"):
            options["best_metric"] = config.keep_best_metric
            if config.get("keep_best_mode"):
                options["best_mode"] = config.keep_best_mode
        return cls(directory, **options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Starts saving `step` (asynchronously); first raises CheckpointError if the previous save failed."""
        self._wait()
        state = _to_disk(state)
        names, leaves, _ = _flatten(state)
        custom: dict[str, Any] = {"meta": meta}
        if _single_file(leaves, self.single_file_bytes):
            item, store = "state_file", dict(zip(names, leaves, strict=True))
        else:
            item, (store, custom["scalar_paths"]) = "state", _pack(state)
        checksums = jax.process_count() == 1  # several processes write their own files: no one manifest
        if checksums:
            custom["checksums"] = 1
            custom = json.loads(json.dumps(custom))  # as Orbax will store it, so that its CRC matches when read
        meta_crc = json_crc(custom) if checksums else None
        save = SingleFileSave(store, meta_crc) if item == "state_file" else ArraySave(store, meta_crc)
        self._saving = step
        self.manager.save(
            step,
            args=ocp.args.Composite(**{item: save}),
            metrics=metrics if self.best_metric is not None else None,
            custom_metadata=custom,
        )

    def restore(
        self, template: TrainState, step: int | None = None, shardings: Any = None
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The checkpoint at `step` (default: the latest intact one), shaped like `template` and placed like it
        or as `shardings` says (a tree of shardings like `template`'s: then, in Orbax's array format, each process
        reads only its shards; a single-file checkpoint is read whole); None if there is none. A leaf stored in
        another dtype than the template's is cast to the template's, as Orbax does; other shapes or tree paths are
        refused (CheckpointMismatch).

        Each step is verified first. A damaged `step` given explicitly raises CheckpointDamaged; without one, damaged
        steps are moved aside for the newest intact one and `self.skipped` says so, one line each (see the module's
        docstring); if every step is damaged, CheckpointError lists them."""
        self.skipped = []
        template = _to_disk(template)
        if step is not None:
            return self._restore_step(step, template, shardings)
        damaged: list[CheckpointDamaged] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = self._restore_step(step, template, shardings)
                break
            except CheckpointDamaged as e:
                damaged.append(e)
        else:
            if not damaged:
                return None
            tried = "".join(f"\n  {e}" for e in damaged)
            raise CheckpointError(f"no intact checkpoint in {self.manager.directory}; tried:{tried}")
        for e in damaged:
            self.skipped.append(f"{e}; moved to {self._move_aside(e)}; resuming from step {step}")
        if damaged:
            self.manager.reload()  # so that those steps can be saved again
        return restored

    def _show(self, path: str) -> str:
        return os.path.relpath(path, os.path.dirname(self.manager.directory))

    def _restore_step(self, step: int, template: Any, shardings: Any) -> tuple[TrainState, dict[str, Any]]:
        step_dir = os.path.join(self.manager.directory, str(step))
        custom = read_step_metadata(step_dir, step, self._show(step_dir))
        item = "state_file" if os.path.isdir(os.path.join(step_dir, "state_file")) else "state"
        if custom.get("checksums"):
            verify_item(os.path.join(step_dir, item), step, custom, self._show(os.path.join(step_dir, item)))
            state, meta = self._read(step, item, template, shardings, custom)
        else:  # an earlier layout, without checksums: a step that cannot be read is damaged
            try:
                state, meta = self._read(step, item, template, shardings, custom)
            except CheckpointMismatch:
                raise
            except Exception as e:
                fault = f"unreadable ({type(e).__name__}: {e})".splitlines()[0][:300]
                raise CheckpointDamaged(step, self._show(os.path.join(step_dir, item)), fault, "unreadable") from e
        return state.replace(rng=jax.random.wrap_key_data(state.rng)), meta

    def _read(self, step: int, item: str, template: Any, shardings: Any, custom: dict[str, Any]) -> Any:
        if item == "state_file":
            return self._restore_file(step, template, shardings), custom.get("meta", {})
        return self._restore_arrays(step, template, shardings, custom)

    def _move_aside(self, e: CheckpointDamaged) -> str:
        """Moves a damaged step to `damaged/<step>-<reason>` (the first free name); returns that path as shown."""
        root = os.path.join(self.manager.directory, "damaged")
        dest, n = os.path.join(root, f"{e.step}-{e.reason}"), 1
        if jax.process_index() == 0:
            os.makedirs(root, exist_ok=True)
            while os.path.exists(dest):
                n += 1
                dest = os.path.join(root, f"{e.step}-{e.reason}-{n}")
            os.rename(os.path.join(self.manager.directory, str(e.step)), dest)
            with open(os.path.join(dest, "DAMAGED.txt"), "w") as f:
                f.write(f"{e}\n")
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"seqjax_move_aside_{e.step}")
        return self._show(dest)

    def _restore_file(self, step: int, template: Any, shardings: Any) -> Any:
        stored = self.manager.restore(step, args=ocp.args.Composite(state_file=SingleFileRestore()))["state_file"]
        names, leaves, _ = _flatten(template)
        if set(stored) != set(names):
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.manager.directory} does not fit the state to restore: it lacks "
                f"{sorted(set(names) - set(stored))} and has {sorted(set(stored) - set(names))} besides"
            )
        out = []
        for name, like, where in zip(names, leaves, _placement(leaves, shardings), strict=True):
            value = stored[name]
            if value.shape != like.shape:
                raise CheckpointMismatch(
                    f"checkpoint step {step}: {name} has shape {value.shape}, the state to restore {like.shape}"
                )
            out.append(place(value.astype(like.dtype, copy=False), where))
        return jax.tree.unflatten(jax.tree.structure(template), out)

    def _restore_arrays(self, step: int, template: Any, shardings: Any, custom: dict[str, Any]) -> tuple[Any, Any]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        if shardings is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)  # fmt: skip
        if os.path.isdir(os.path.join(self.manager.directory, str(step), "meta")):  # the earlier layout
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ArrayRestore(abstract), meta=ocp.args.JsonRestore())
            )
            return restored["state"], restored["meta"]
        packed, expected = _pack(abstract, read=False)  # the scalars come back as numpy vectors
        if custom.get("scalar_paths") != expected:  # the vectors hold no names: they would fill the wrong leaves
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.manager.directory} holds the scalars "
                f"{custom.get('scalar_paths')}, but the state to restore has {expected}"
            )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ArrayRestore(packed)))
        return _unpack(restored["state"], template, shardings), custom.get("meta", {})

    def _wait(self) -> None:
        """Waits for the save in flight; raises CheckpointError naming its step if it failed (its temporary
        directory is left for Orbax to clean up, and the steps before it are all kept)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {self._saving} failed to save in {self.manager.directory} ({type(e).__name__}: "
                f"{e}); the checkpoints before it are kept"
            ) from e
        finally:
            self._saving = None

    def wait(self) -> None:
        self._wait()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self.manager.close()
