"""Parameter EMA (`ema_decay`): the recurrence by hand, `eval_ema_*` metrics beside the raw ones equal to evaluating
the checkpointed EMA parameters, the report made with them, an exact resume, and bad values named."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.errors import ConfigError
from seqjax.training import TrainState, make_optimizer, make_train_step, read_metrics, train_and_evaluate
from seqjax.training.checkpoint import Checkpointer
from tests.training.toy_task import ToyTask, toy_config


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        yield


def test_the_average_follows_its_recurrence():
    """ema_0 = the initial parameters; ema_t = d * ema_(t-1) + (1 - d) * params_t, in float64 by hand from the
    parameters after each step."""
    config = toy_config(dropout=0.0)
    task = ToyTask(config)
    params, _ = task.init(jax.random.key(0))
    tx, d = optax.adam(3e-2), 0.8
    state = TrainState.create(params, tx, jax.random.key(1), ema=True)
    step = jax.jit(make_train_step(task.loss_fn, tx, ema_decay=d))
    want = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    for i in range(6):
        state, _ = step(state, task.train_batch(i))
        want = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64), want, state.params)
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(state.ema_params["w1"], state.params["w1"])  # it lags the parameters


def test_the_loop_evaluates_checkpoints_and_reports_the_average(tmp_path, capsys):
    config = toy_config(num_train_steps=10, eval_every_steps=5, checkpoint_every_steps=5, dropout=0.0, ema_decay=0.7)
    task = ToyTask(config)
    summary = train_and_evaluate(config, str(tmp_path / "run"), task)
    rows = read_metrics(str(tmp_path / "run"))
    assert {"eval_loss", "eval_ema_loss"} <= rows[5].keys() and rows[10]["eval_ema_loss"] != rows[10]["eval_loss"]
    # The checkpointed EMA parameters give the logged eval_ema_loss, and the report is made with them.
    params, model_state = task.init(jax.random.key(0))
    state = TrainState.create(params, make_optimizer(config), jax.random.key(1), model_state, ema=True)
    restored, _ = Checkpointer(str(tmp_path / "run" / "checkpoints")).restore(state)
    ema = restored.ema_params
    loss = np.mean([float(task.metric_fn(ema, {}, b)["loss"]) for b in task.eval_batches()])
    assert rows[10]["eval_ema_loss"] == pytest.approx(loss, rel=1e-6)
    assert summary["w1_norm"] == pytest.approx(float(optax.tree.norm(ema["w1"])), rel=1e-6)
    # Resume: without the checkpoint of step 10, the rerun continues from step 5 to the same EMA, bitwise.
    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "10")
    capsys.readouterr()
    train_and_evaluate(config, str(tmp_path / "cut"), ToyTask(config))
    assert "resumed from step 5" in capsys.readouterr().out
    again, _ = Checkpointer(str(tmp_path / "cut" / "checkpoints")).restore(state)
    raw = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(raw(a), raw(b))


def test_off_keeps_no_average_and_bad_values_are_named(tmp_path):
    params = {"w": jnp.ones(3)}
    assert TrainState.create(params, optax.sgd(0.1), jax.random.key(0)).ema_params is None
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        make_train_step(lambda *a: None, optax.sgd(0.1), ema_decay=1.0)
    with pytest.raises(ValueError, match="needs a state created with"):
        loss = lambda p, s, b, r: (jnp.sum(p["w"]), ({}, s))
        state = TrainState.create(params, optax.sgd(0.1), jax.random.key(0))
        make_train_step(loss, optax.sgd(0.1), ema_decay=0.5)(state, {})
    config = toy_config(ema_decay=1.5)
    with pytest.raises(ConfigError, match="ema_decay"):
        train_and_evaluate(config, str(tmp_path), ToyTask(config))


def test_the_average_is_the_same_in_every_parallel_mode():
    """The EMA update runs inside the compiled step of each mode: none, jit and pmap on 4 devices agree."""
    from seqjax.training.parallel import Parallel

    config = toy_config(dropout=0.0)
    task = ToyTask(config)
    params, model_state = task.init(jax.random.key(0))
    tx = optax.adam(3e-2)
    emas = {}
    for mode in ("none", "jit", "pmap"):
        par = Parallel(mode, None if mode == "none" else jax.devices()[:4])
        state = TrainState.create(params, tx, jax.random.key(1), model_state, ema=True)
        step, dev = par.train_step(task.loss_fn, tx, state, ema_decay=0.9), par.put_state(state)
        for i in range(4):
            dev, _ = step(dev, par.put_batch(task.train_batch(i)))
        emas[mode] = par.get_state(dev).ema_params
    for mode in ("jit", "pmap"):
        for a, b in zip(jax.tree.leaves(emas[mode]), jax.tree.leaves(emas["none"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=mode)
