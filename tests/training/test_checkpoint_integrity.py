"""Checkpoints that survive damage: each kind of damage to the newest step, in both layouts, is reported (step,
file, fault) and the previous step restores exactly; the loop resumes from it bitwise; all damaged is an error; a
write that fails part-way (no space) is reported and keeps the older steps."""

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.training import TrainState
from seqjax.training.checkpoint import Checkpointer, CheckpointError, SingleFileHandler
from seqjax.training.loop import read_metrics, train_and_evaluate
from tests.training.toy_task import ToyTask, toy_config

LAYOUTS = {"state_file": 16 << 20, "state": 0}  # single_file_bytes giving each layout


def _state(v: float) -> TrainState:
    params = {"w": jnp.arange(6.0).reshape(2, 3) * v, "b": jnp.full(3, v)}
    state = TrainState.create(params, optax.adam(1e-3), jax.random.key(int(v)), {})
    return state.replace(step=jnp.asarray(int(v), jnp.int32))


def _save(directory, layout, steps=(1, 2, 3), max_to_keep=3):
    ckpt = Checkpointer(str(directory), max_to_keep=max_to_keep, single_file_bytes=LAYOUTS[layout])
    for s in steps:
        ckpt.save(s, _state(s), {"step": s})
    ckpt.close()


def _assert_is(restored, v):
    state, meta = restored
    expected = _state(v)
    assert meta == {"step": v}
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == v
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(expected.rng))


def _data_file(step_dir):
    """The largest OCDBT data file of Orbax's array format."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs if os.path.basename(r) == "d"]
    return os.path.relpath(max(files, key=os.path.getsize), step_dir)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(min(100, os.path.getsize(path) // 2))


def _flip(path):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


DAMAGE = [  # (layout, file in the step directory, damage, the fault reported)
    ("state_file", "state_file/state.bin", _truncate, "truncated"),
    ("state_file", "state_file/index.json", _truncate, "truncated"),
    ("state_file", "_CHECKPOINT_METADATA", _truncate, "unreadable metadata"),
    ("state_file", "state_file/state.bin", _flip, "checksum mismatch"),
    ("state_file", "state_file/state.bin", os.remove, "missing"),
    ("state_file", "state_file/checksums.json", _flip, "unreadable"),
    ("state", "DATA", _truncate, "truncated"),
    ("state", "state/_METADATA", _truncate, "truncated"),
    ("state", "_CHECKPOINT_METADATA", _truncate, "unreadable metadata"),
    ("state", "DATA", _flip, "checksum mismatch"),
    ("state", "DATA", os.remove, "missing"),
    ("state", "state/manifest.ocdbt", os.remove, "missing"),
]


@pytest.mark.parametrize(("layout", "name", "damage", "fault"), DAMAGE,
                         ids=[f"{la}-{n.split('/')[-1]}-{d.__name__}" for la, n, d, _ in DAMAGE])  # fmt: skip
def test_damaged_newest_step_is_reported_and_the_previous_restores(tmp_path, layout, name, damage, fault):
    _save(tmp_path / "checkpoints", layout)
    step_dir = tmp_path / "checkpoints" / "3"
    name = _data_file(step_dir) if name == "DATA" else name
    damage(str(step_dir / name))

    ckpt = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=3, single_file_bytes=LAYOUTS[layout])
    _assert_is(ckpt.restore(_state(0)), 2)
    (line,) = ckpt.skipped
    assert line.startswith(f"checkpoint step 3 is damaged: checkpoints/3/{name}: ")
    assert fault in line and line.endswith("resuming from step 2") and "\n" not in line
    # Moved aside, out of the step list, so that step 3 can be saved again by the resumed run.
    (moved,) = os.listdir(tmp_path / "checkpoints" / "damaged")
    assert moved.startswith("3-") and f"checkpoints/damaged/{moved}" in line
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, _state(30), {"step": 30})
    ckpt.close()
    _assert_is(Checkpointer(str(tmp_path / "checkpoints")).restore(_state(0)), 30)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_damaged_is_an_error_listing_what_was_tried(tmp_path, layout):
    _save(tmp_path, layout, steps=(1, 2))
    for s in (1, 2):
        os.truncate(tmp_path / str(s) / "_CHECKPOINT_METADATA", 50)
    ckpt = Checkpointer(str(tmp_path), single_file_bytes=LAYOUTS[layout])
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        ckpt.restore(_state(0))
    assert "checkpoint step 2 is damaged" in str(info.value) and "checkpoint step 1 is damaged" in str(info.value)
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "damaged").exists()  # nothing moved
    ckpt.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoints_without_checksums_still_restore(tmp_path, layout):
    """The layout before checksums: no checksums.json and no "checksums" flag in the custom metadata."""
    _save(tmp_path, layout, steps=(1, 2))
    for s in (1, 2):
        item = tmp_path / str(s) / layout
        os.remove(item / "checksums.json")
        meta_file = tmp_path / str(s) / "_CHECKPOINT_METADATA"
        record = json.loads(meta_file.read_text())
        del record["custom_metadata"]["checksums"]
        meta_file.write_text(json.dumps(record))
    ckpt = Checkpointer(str(tmp_path), single_file_bytes=LAYOUTS[layout])
    _assert_is(ckpt.restore(_state(0)), 2)
    assert ckpt.skipped == []
    if layout == "state_file":  # what can be verified still is: a short state.bin cannot be read
        _truncate(tmp_path / "2" / "state_file" / "state.bin")
        _assert_is(ckpt.restore(_state(0)), 1)
        assert "checkpoint step 2 is damaged: " in ckpt.skipped[0] and "/2/state_file: unreadable" in ckpt.skipped[0]
    ckpt.close()


def _fail_single_file(monkeypatch):
    def no_space(directory, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SingleFileHandler, "_write", staticmethod(no_space))


def _fail_array_format(monkeypatch):
    from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as base

    async def no_space(self, directory, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base.BasePyTreeCheckpointHandler, "_write_metadata_file", no_space)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_write_that_fails_is_reported_and_keeps_the_older_steps(tmp_path, monkeypatch, layout):
    """max_to_keep=2: saving step 3 would delete step 1, but only once step 3 is written and read back."""
    _save(tmp_path, layout, steps=(1, 2), max_to_keep=2)
    with monkeypatch.context() as m:
        (_fail_single_file if layout == "state_file" else _fail_array_format)(m)
        ckpt = Checkpointer(str(tmp_path), max_to_keep=2, single_file_bytes=LAYOUTS[layout])
        ckpt.save(3, _state(3), {"step": 3})
        with pytest.raises(CheckpointError, match=r"checkpoint step 3 failed to save.*No space left"):
            ckpt.close()
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2, single_file_bytes=LAYOUTS[layout])
    assert ckpt.all_steps() == [1, 2]
    _assert_is(ckpt.restore(_state(0)), 2)
    assert ckpt.skipped == []
    ckpt.close()


def test_a_file_that_reads_back_wrong_fails_the_save_before_older_steps_go(tmp_path, monkeypatch):
    _save(tmp_path, "state_file", steps=(1, 2), max_to_keep=2)
    write = SingleFileHandler._write

    def write_then_flip(directory, arrays):
        written = write(directory, arrays)
        _flip(os.path.join(directory, "state.bin"))
        return written

    monkeypatch.setattr(SingleFileHandler, "_write", staticmethod(write_then_flip))
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    ckpt.save(3, _state(3), {"step": 3})
    with pytest.raises(CheckpointError, match=r"checkpoint step 3 failed to save.*read back"):
        ckpt.wait()
    ckpt.close()
    assert Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def _toy(workdir, **overrides):
    config = toy_config(eval_every_steps=0, schedule="constant", warmup_steps=0, **overrides)  # lr: not the horizon
    with jax.numpy_dtype_promotion("standard"):
        train_and_evaluate(config, str(workdir), ToyTask(config))
    return {s: r["train_loss"] for s, r in read_metrics(str(workdir)).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _toy(tmp_path_factory.mktemp("uninterrupted"), num_train_steps=40)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_loop_resumes_from_the_newest_intact_step_bitwise(tmp_path, monkeypatch, capsys, uninterrupted, layout):
    if layout == "state":
        from seqjax.training import loop

        class ArrayFormat(Checkpointer):  # Orbax's array format even for this small state
            def __init__(self, *a, **k):
                super().__init__(*a, **k, single_file_bytes=0)

        monkeypatch.setattr(loop, "Checkpointer", ArrayFormat)
    _toy(tmp_path, num_train_steps=30)
    step_dir = tmp_path / "checkpoints" / "30"
    name = "state_file/state.bin" if layout == "state_file" else _data_file(step_dir)
    _flip(str(step_dir / name))
    capsys.readouterr()
    losses = _toy(tmp_path, num_train_steps=40)
    out = capsys.readouterr().out
    assert f"checkpoint step 30 is damaged: checkpoints/30/{name}: checksum mismatch" in out
    assert "; resuming from step 20\n" in out and "resumed from step 20" in out
    assert losses == uninterrupted  # steps 21..30 rerun (the last line for a step wins), then 31..40
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [20, 30, 40]


def test_the_loop_raises_naming_the_step_that_failed_to_save(tmp_path, monkeypatch, uninterrupted):
    _toy(tmp_path, num_train_steps=10)
    with monkeypatch.context() as m:
        _fail_single_file(m)
        with pytest.raises(CheckpointError, match="checkpoint step 20 failed to save"):
            _toy(tmp_path, num_train_steps=30)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [10]
    assert _toy(tmp_path, num_train_steps=40) == uninterrupted
