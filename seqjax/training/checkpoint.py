"""Orbax checkpoints of a `TrainState`, with the config and the data position beside it.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it when the save is
finished), so a run killed mid-write resumes from the last finished checkpoint. States are saved as one
unreplicated copy with the PRNG key as raw key data, so a checkpoint written under any parallel mode or device count
restores under any other.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from seqjax.training.state import TrainState


def _to_disk(state: TrainState) -> TrainState:
    return state.replace(rng=jax.random.key_data(state.rng))


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
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_disk(state)), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics if self.best_metric is not None else None)

    def restore(
        self, template: TrainState, step: int | None = None, shardings: Any = None
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The checkpoint at `step` (default: the latest finished one), shaped like `template` and placed like it
        or as `shardings` says (a tree of shardings like `template`'s: then each process reads only its shards);
        None if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_disk(template))
        if shardings is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)  # fmt: skip
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        state = restored["state"]
        return state.replace(rng=jax.random.wrap_key_data(state.rng)), restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
