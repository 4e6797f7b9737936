"""The loop: exact resume after SIGKILL, SIGTERM saves and exits 0, NaN stops, checkpoints kept, bad configs, and
checkpoints that move between parallel modes and device counts."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.training.loop import read_metrics, train_and_evaluate
from seqjax.training.summary import read_scalars
from tests.training.toy_task import ToyTask, toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(workdir, *args, wait=True, **env):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "training", "toy_task.py"), str(workdir), *args]
    environ = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


def _wait_for_step(workdir, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = read_metrics(workdir)
        if rows and max(rows) >= step:
            return max(rows)
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {workdir}")


def _losses(workdir):
    return {s: r["train_loss"] for s, r in read_metrics(workdir).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    rc, out = _run(workdir)
    assert rc == 0, out
    return _losses(workdir)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, uninterrupted):
    proc = _run(tmp_path, "sleep=0.03", wait=False)
    _wait_for_step(tmp_path, 27, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A save killed while writing leaves a temporary directory; it must never be restored.
    os.makedirs(tmp_path / "checkpoints" / "50.orbax-checkpoint-tmp-1234567890" / "state")
    rc, out = _run(tmp_path)
    assert rc == 0, out
    assert "resumed from step" in out and "resumed from step 50" not in out
    assert _losses(tmp_path) == uninterrupted  # every step, bitwise
    assert sorted(uninterrupted) == list(range(1, 61))


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path, uninterrupted):
    proc = _run(tmp_path, "sleep=0.03", wait=False)
    seen = _wait_for_step(tmp_path, 13, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    stopped = int(out.split("SIGTERM: saved step ")[1].split(";")[0])
    assert stopped >= seen and stopped in [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    rc, out = _run(tmp_path)
    assert rc == 0 and f"resumed from step {stopped}" in out, out
    assert _losses(tmp_path) == uninterrupted


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = toy_config(nan_at_step=25)
    with jax.numpy_dtype_promotion("standard"), pytest.raises(FloatingPointError, match="at step 25"):
        train_and_evaluate(config, str(tmp_path), ToyTask(config))
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [10, 20]


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path):
    config = toy_config(num_train_steps=10, eval_every_steps=0)
    with jax.numpy_dtype_promotion("standard"):
        first = train_and_evaluate(config, str(tmp_path), ToyTask(config))
        again = train_and_evaluate(config, str(tmp_path), ToyTask(config))
    assert again == first and "eval_loss" in first  # the final evaluation is not lost


def test_max_to_keep_and_outputs(tmp_path):
    config = toy_config(num_train_steps=40, max_checkpoints_to_keep=2)
    with jax.numpy_dtype_promotion("standard"):
        summary = train_and_evaluate(config, str(tmp_path), ToyTask(config))
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [30, 40]
    rows = read_metrics(str(tmp_path))
    assert sorted(rows) == list(range(1, 41)) and "eval_loss" in rows[20] and "learning_rate" in rows[1]
    assert summary["step"] == 40 and "w1_norm" in summary and (tmp_path / "curves.png").exists()
    assert rows[40]["eval_loss"] < rows[1]["train_loss"]  # it learns
    (events,) = (tmp_path / "tensorboard").iterdir()  # the same rows as TensorBoard scalars
    scalars = dict(read_scalars(str(events)))
    assert sorted(scalars) == list(range(1, 41))
    for step in (1, 20, 40):
        keys = [k for k in ("train_loss", "eval_loss", "learning_rate") if k in rows[step]]
        np.testing.assert_allclose([scalars[step][k] for k in keys], [rows[step][k] for k in keys], rtol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(dict(batch_size=0), "batch_size"), (dict(parallel="tpu"), "parallel"), (dict(seed="0"), "seed")],
)
def test_bad_configs_fail_before_compiling(tmp_path, overrides, key):
    config = toy_config(**overrides) if "seed" not in overrides else toy_config()
    if "seed" in overrides:
        config.unlock()
        config.seed = None
        key = "seed"
    with pytest.raises(ValueError, match=rf"config\.{key}"):
        train_and_evaluate(config, str(tmp_path), ToyTask(config))
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
def test_checkpoint_moves_between_modes_and_device_counts(tmp_path):
    """20 steps on one device, 20 under pmap on 8 devices, 20 under jit on 8 with the weights split 4 ways (FSDP):
    the same losses as one device throughout (no dropout here: under pmap each device draws its own masks)."""
    # A constant schedule: the cosine one depends on num_train_steps, which the three legs change.
    base = toy_config(batch_size=16, num_train_steps=60, eval_every_steps=0, dropout=0.0, schedule="constant")
    with jax.numpy_dtype_promotion("standard"):
        train_and_evaluate(base, str(tmp_path / "ref"), ToyTask(base))
        for steps, mode, fsdp in ((20, "none", 1), (40, "pmap", 1), (60, "jit", 4)):
            config = toy_config(**{**base.to_dict(), "num_train_steps": steps, "parallel": mode, "fsdp": fsdp})
            train_and_evaluate(config, str(tmp_path / "moved"), ToyTask(config))
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "moved")
    assert sorted(got) == sorted(ref) == list(range(1, 61))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-4)


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("mode", ["none", "pmap", "jit"])
def test_train_step_compiles_once(tmp_path, mode):
    traces = []

    class Counting(ToyTask):
        def loss_fn(self, params, model_state, batch, rng):
            traces.append(1)  # runs only while JAX traces the step
            return super().loss_fn(params, model_state, batch, rng)

    config = toy_config(num_train_steps=25, parallel=mode, eval_every_steps=10)
    with jax.numpy_dtype_promotion("standard"):
        train_and_evaluate(config, str(tmp_path), Counting(config))
    assert len(traces) == 1


def test_keep_best_keeps_the_lowest_eval_loss(tmp_path):
    config = toy_config(
        num_train_steps=60, eval_every_steps=10, checkpoint_every_steps=10, max_checkpoints_to_keep=2,
        keep_best_metric="eval_loss", keep_best_mode="min",
    )  # fmt: skip
    with jax.numpy_dtype_promotion("standard"):
        train_and_evaluate(config, str(tmp_path), ToyTask(config))
    rows = read_metrics(str(tmp_path))
    best = sorted(range(10, 61, 10), key=lambda s: rows[s]["eval_loss"])[:2]
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept == sorted(best), (kept, {s: rows[s]["eval_loss"] for s in range(10, 61, 10)})


def test_profile_window_writes_a_trace(tmp_path):
    config = toy_config(num_train_steps=12, profile_steps="3,6")
    with jax.numpy_dtype_promotion("standard"):
        train_and_evaluate(config, str(tmp_path), ToyTask(config))
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
    assert any(f.endswith((".xplane.pb", ".trace.json.gz")) for f in traces), traces
    bad = toy_config(profile_steps="6,3")
    with pytest.raises(ValueError, match=r"config\.profile_steps"):
        train_and_evaluate(bad, str(tmp_path / "bad"), ToyTask(bad))


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(monkeypatch, capsys):
    from seqjax.training import progress

    row = {"step": 5, "train_loss": 0.5, "steps_per_sec": 10.0}
    progress.print_progress(row, 10)
    assert capsys.readouterr().out == "step      5/10  train_loss 0.5  steps_per_sec 10\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress.print_progress(row, 10)
    out = capsys.readouterr().out
    assert out.startswith("\r[##########..........] step      5/10") and not out.endswith("\n")
    progress.print_progress({**row, "step": 10}, 10)
    assert capsys.readouterr().out.endswith("\n")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_with_one_process_and_their_checkpoint_moves(tmp_path):
    """Two processes on 127.0.0.1 (jax.distributed, 2 CPU devices each, "jit" with the weights split over all 4,
    across the processes) train 40 steps; one process on one device resumes from their checkpoint to 60. Every
    loss equals a single-process 4-device run's (dropout on: the masks come from the global key, whatever the
    layout)."""
    common = ["parallel=jit", "fsdp=4", "schedule=constant", "eval_every_steps=0"]
    rc, out = _run(tmp_path / "ref", *common, "num_train_steps=60", TOY_DEVICES="4")
    assert rc == 0, out
    env = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2", TOY_DEVICES="2")
    procs = [
        _run(tmp_path / "multi", *common, "num_train_steps=40", wait=False, JAX_PROCESS_ID=str(i), **env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "step     40/40" in outs[0] and "step" not in outs[1]  # the first process alone reports
    rc, out = _run(tmp_path / "multi", "parallel=none", "schedule=constant", "eval_every_steps=0", "num_train_steps=60")
    assert rc == 0 and "resumed from step 40" in out, out
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "multi")
    assert sorted(got) == sorted(ref) == list(range(1, 61))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)


def test_a_resumed_run_follows_its_config_not_the_checkpoint(tmp_path):
    """The optimizer's numbers live in its state; a rerun with a longer horizon and another learning rate uses the
    new ones from the resumed step on (the moments and the step count come from the checkpoint)."""
    base = dict(schedule="constant", warmup_steps=0, eval_every_steps=0, checkpoint_every_steps=10, dropout=0.0)
    first = toy_config(**base, num_train_steps=10, learning_rate=1e-3)
    longer = toy_config(**base, num_train_steps=14, learning_rate=2e-3)
    with jax.numpy_dtype_promotion("standard"):
        train_and_evaluate(first, str(tmp_path), ToyTask(first))
        train_and_evaluate(longer, str(tmp_path), ToyTask(longer))
    rows = read_metrics(str(tmp_path))
    assert sorted(rows) == list(range(1, 15))
    assert [rows[s]["learning_rate"] for s in (1, 10)] == pytest.approx([1e-3, 1e-3])
    assert [rows[s]["learning_rate"] for s in (11, 14)] == pytest.approx([2e-3, 2e-3])


@pytest.mark.parametrize("layout", ["state_file", "state"])
def test_checkpoint_layouts_restore_bitwise_and_read_the_earlier_one(tmp_path, layout):
    """A state saved and restored is bitwise the same, with its metadata, in both layouts: a small state as one file
    (every leaf in the index, bfloat16 included), a larger one (here: the limit set to 0) in Orbax's array format
    with its 0-d leaves stored as one vector per dtype. A state of another shape is refused, naming the difference.
    A checkpoint written in the earlier layout (one array per leaf, a "meta" JSON item) still restores."""
    import orbax.checkpoint as ocp

    from seqjax.training import TrainState, make_optimizer
    from seqjax.training.checkpoint import Checkpointer, _to_disk

    config = toy_config()
    params, _ = ToyTask(config).init(jax.random.key(0))
    tx = make_optimizer(config)
    model_state = {"bf16": jnp.arange(5, dtype=jnp.bfloat16) / 3}
    state = TrainState.create(params, tx, jax.random.key(1), model_state)
    with jax.numpy_dtype_promotion("standard"):  # as the loop runs
        state = state.replace(step=state.step + 7, opt_state=tx.update(params, state.opt_state, params)[1])
    num_scalars = sum(np.ndim(x) == 0 for x in jax.tree.leaves(_to_disk(state)))
    assert num_scalars >= 3  # the step, adam's count, the injected hyperparameters

    def same(a, b):
        la, lb = jax.tree.leaves(_to_disk(a)), jax.tree.leaves(_to_disk(b))
        assert jax.tree.structure(_to_disk(a)) == jax.tree.structure(_to_disk(b))
        for x, y in zip(la, lb, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    ckpt = Checkpointer(str(tmp_path / "new"), single_file_bytes=16 << 20 if layout == "state_file" else 0)
    saved = jax.tree.map(jnp.copy, state)
    ckpt.save(7, saved, {"config": {"a": 1}, "step": 7})
    for x in jax.tree.leaves(saved):  # the loop donates the state to the next step: the save must not need it
        x.delete()
    ckpt.wait()
    assert os.listdir(tmp_path / "new" / "7") and (tmp_path / "new" / "7" / layout).is_dir()
    if layout == "state_file":
        import json

        index = json.loads((tmp_path / "new" / "7" / "state_file" / "index.json").read_text())
        assert len(index) == len(jax.tree.leaves(_to_disk(state)))
        assert "bfloat16" in {e["dtype"] for e in index}
    else:
        stored = ckpt.manager.item_metadata(7)["state"]
        assert set(stored) == {"arrays", "scalars"}
        assert sum(np.prod(m.shape) for m in stored["scalars"].values()) == num_scalars
        assert len(stored["arrays"]) == len(jax.tree.leaves(state)) - num_scalars
    template = TrainState.create(params, tx, jax.random.key(5), jax.tree.map(jnp.zeros_like, model_state))
    restored, meta = ckpt.restore(template)
    same(restored, state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))  # usable inside jit, as Orbax gives
    assert meta == {"config": {"a": 1}, "step": 7}
    # One more 0-d leaf: in the file it is missing; packed, the vectors would not line up.
    message = "does not fit" if layout == "state_file" else "holds the scalars"
    with pytest.raises(ValueError, match=message):
        ckpt.restore(template.replace(model_state={**model_state, "extra": jnp.zeros(())}))
    if layout == "state_file":
        with pytest.raises(ValueError, match="has shape"):
            ckpt.restore(template.replace(model_state={"bf16": jnp.zeros(4, jnp.bfloat16)}))
    ckpt.close()
    if layout == "state_file":
        return

    old = ocp.CheckpointManager(str(tmp_path / "old"))
    old.save(
        7, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_disk(state)), meta=ocp.args.JsonSave({"step": 7}))
    )
    old.wait_until_finished()
    old.close()
    restored, meta = Checkpointer(str(tmp_path / "old")).restore(template)
    same(restored, state)
    assert meta == {"step": 7}


def test_a_typed_key_in_the_model_state_goes_to_orbax_format(tmp_path):
    """The single file holds arrays of numpy dtypes; a state with a typed PRNG key besides its own `rng` is saved in
    Orbax's array format instead, and restores."""
    from seqjax.training import TrainState, make_optimizer
    from seqjax.training.checkpoint import Checkpointer

    config = toy_config()
    params, _ = ToyTask(config).init(jax.random.key(0))
    tx = make_optimizer(config)
    state = TrainState.create(params, tx, jax.random.key(1), {"noise_key": jax.random.key(3)})
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, state, {})
    ckpt.wait()
    assert (tmp_path / "1" / "state").is_dir() and not (tmp_path / "1" / "state_file").exists()
    restored, _ = ckpt.restore(TrainState.create(params, tx, jax.random.key(5), {"noise_key": jax.random.key(6)}))
    ckpt.close()
    np.testing.assert_array_equal(
        jax.random.key_data(restored.model_state["noise_key"]), jax.random.key_data(jax.random.key(3))
    )
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(1)))
