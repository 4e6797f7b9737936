"""Gradient accumulation (`grad_accum_steps=K`): K micro-batches summed inside one compiled step give the update of
one step on the whole batch, in every parallel mode, on padded batches whose micro-batches hold different numbers of
real tokens, with a loss of two terms of their own weights; the compiled step keeps fewer temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.errors import ConfigError
from seqjax.training.losses import cross_entropy
from seqjax.training.parallel import Parallel
from seqjax.training.state import TrainState, make_train_step

V, T, D, B = 11, 6, 8, 16


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        yield


def _batch(seed):
    """B rows, each with a random number (0..T) of real tokens: micro-batches and devices get uneven weights."""
    r = np.random.default_rng(seed)
    lengths = r.integers(0, T + 1, B)
    lengths[:4] = 0  # rows 0-3 all padding
    weights = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    x, y = r.integers(0, V, (B, T)).astype(np.int32), r.integers(0, V, (B, T)).astype(np.int32)
    return {"x": x, "y": y, "weights": weights, "other": (r.random((B,)) < 0.5).astype(np.float32)}


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"embed": jax.random.normal(k1, (V, D)), "out": jax.random.normal(k2, (D, V)) * 0.5}


def _loss(params, model_state, batch, rng):
    """Two terms, each averaged over its own weights (as dalle's text and image losses): a token cross-entropy and
    a squared norm of the first hidden state over the rows marked `other`."""
    hidden = jnp.tanh(params["embed"][batch["x"]])
    tokens, aux = cross_entropy(hidden @ params["out"], batch["y"], weights=batch["weights"], as_mean=True)
    rows = type(tokens).of(jnp.sum(hidden[:, 0] ** 2, axis=-1), batch["other"])
    return (tokens, rows), ({"accuracy": aux["accuracy"], "rows": rows}, model_state)


def _record_grads():
    """An 'optimizer' whose state is the last gradient (and whose updates are zero)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda updates, state, params=None: (jax.tree.map(jnp.zeros_like, updates), updates),
    )


def _run(par, k, steps=3):
    """(train losses and metrics of `steps` Adam steps, gradients of the first step) with K = k."""
    out = {}
    for name, tx, n in (("grads", _record_grads(), 1), ("adam", optax.adam(3e-2), steps)):
        state = TrainState.create(_params(), tx, jax.random.key(1))
        step = par.train_step(_loss, tx, state, grad_accum_steps=k)
        dev, metrics = par.put_state(state), []
        for i in range(n):
            dev, m = step(dev, par.put_batch(_batch(i)))
            metrics.append({key: float(v) for key, v in m.items()})
        out[name] = jax.device_get(par.get_state(dev).opt_state) if name == "grads" else metrics
    out["params"] = jax.device_get(par.get_state(dev).params)
    return out


def _modes():
    devices = jax.devices()[:4]
    return {"none": Parallel("none"), "jit": Parallel("jit", devices), "pmap": Parallel("pmap", devices)}


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("mode", ["none", "jit", "pmap"])
def test_accumulated_step_equals_one_step_on_the_whole_batch(mode):
    whole = _run(Parallel("none"), 1)
    par = _modes()[mode]
    for k in (2, 4) if mode == "none" else (2,):  # pmap / jit: 4 rows per device, 2 micro-batches of 2
        got = _run(par, k)
        for a, b in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(whole["grads"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"gradients, {mode} K={k}")
        for step, (a, b) in enumerate(zip(got["adam"], whole["adam"], strict=True)):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=f"{key} at step {step}, {mode} K={k}")
        for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(whole["params"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"parameters, {mode} K={k}")


def test_averaging_micro_batch_means_would_differ():
    """The micro-batches of these batches are uneven enough that the mean of their means (what a naive
    accumulation computes) is off the batch's loss by far more than the tolerance above (1e-6), which can fail."""
    batch = _batch(0)
    (tokens, _), _ = _loss(_params(), {}, batch, None)
    micro = [jax.tree.map(lambda x, j=j: x[j::4], batch) for j in range(4)]
    means = [float(_loss(_params(), {}, m, None)[0][0].value()) for m in micro]
    assert abs(np.mean(means) - float(tokens.value())) > 1e-3 * abs(float(tokens.value()))


def test_micro_batches_keep_fewer_temporaries():
    """A wide hidden layer on 512 rows: the compiled step with K=8 needs far less scratch memory than K=1."""
    params = {"w1": jnp.zeros((64, 2048)), "w2": jnp.zeros((2048, 1))}

    def loss(p, model_state, batch, rng):
        h = jnp.tanh(batch["x"] @ p["w1"])
        return jnp.mean((h @ p["w2"] - batch["y"]) ** 2), ({}, model_state)

    tx = optax.sgd(0.1)
    state = TrainState.create(params, tx, jax.random.key(0))
    batch = {"x": jnp.ones((512, 64)), "y": jnp.ones((512, 1))}
    temp = {}
    for k in (1, 8):
        compiled = jax.jit(make_train_step(loss, tx, grad_accum_steps=k)).lower(state, batch).compile()
        temp[k] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[8] < temp[1] / 3, temp


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="grad_accum_steps must be an int >= 1"):
        make_train_step(_loss, optax.sgd(0.1), grad_accum_steps=0)
    with pytest.raises(ConfigError, match=r"grad_accum_steps.*does not divide the 4 rows"):
        Parallel("jit", jax.devices()[:4]).check_batch_size(16, grad_accum_steps=3)
    step = make_train_step(_loss, optax.sgd(0.1), grad_accum_steps=3)
    with pytest.raises(ValueError, match=r"grad_accum_steps=3 must divide the batch rows of each device, got \[16\]"):
        step(TrainState.create(_params(), optax.sgd(0.1), jax.random.key(0)), _batch(0))


def test_the_loop_reads_grad_accum_steps_from_the_config(tmp_path):
    """`train_and_evaluate` with `grad_accum_steps` (a config field of every experiment) logs the loss curve of
    the whole-batch run (no dropout: micro-batches draw their own dropout keys); a K that does not divide the rows
    is a config error naming the key."""
    from seqjax.training import read_metrics, train_and_evaluate
    from tests.training.toy_task import ToyTask, toy_config

    curves = {}
    for k in (None, 4):
        config = toy_config(num_train_steps=10, eval_every_steps=0, dropout=0.0, grad_accum_steps=k)
        train_and_evaluate(config, str(tmp_path / str(k)), ToyTask(config))
        curves[k] = [m["train_loss"] for _, m in sorted(read_metrics(str(tmp_path / str(k))).items())]
    assert len(curves[4]) == 10
    np.testing.assert_allclose(curves[4], curves[None], rtol=1e-6)
    config = toy_config(grad_accum_steps=3)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        train_and_evaluate(config, str(tmp_path / "bad"), ToyTask(config))
