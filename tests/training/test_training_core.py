"""Training core: losses against numpy, schedules and optimizer options, the pure step, and parallel modes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from seqjax.models import DecoderLM, TransformerConfig
from seqjax.training.losses import cross_entropy, mean_squared_error
from seqjax.training.optim import (
    decay_mask,
    learning_rate,
    make_optimizer,
    make_schedule,
    with_hyperparameters_of,
)
from seqjax.training.parallel import Parallel
from seqjax.training.state import TrainState, make_train_step


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        yield


def test_cross_entropy_against_numpy(rng):
    logits = np.asarray(jax.random.normal(rng, (3, 5, 7)) * 2)
    labels = np.asarray(jax.random.randint(rng, (3, 5), 0, 7))
    weights = np.asarray(jax.random.uniform(jax.random.fold_in(rng, 1), (3, 5)) > 0.3, np.float32)
    eps, z = 0.1, 1e-2
    loss, aux = cross_entropy(logits, labels, weights=weights, label_smoothing=eps, z_loss=z)
    lse = np.log(np.exp(logits).sum(-1))
    logp = logits - lse[..., None]
    target = np.eye(7)[labels] * (1 - eps) + eps / 7
    ce = -(target * logp).sum(-1)
    want = ((ce + z * lse**2) * weights).sum() / weights.sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], ((logits.argmax(-1) == labels) * weights).sum() / weights.sum())
    np.testing.assert_allclose(aux["weight"], weights.sum())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, labels, label_smoothing=1.0)


def test_mean_squared_error_weights(rng):
    pred, target = jax.random.normal(rng, (4, 3)), jnp.zeros((4, 3))
    w = jnp.array([1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(mean_squared_error(pred, target, weights=w), np.mean(np.asarray(pred)[[0, 2]] ** 2))


def _opt_config(**kw):
    base = dict(optimizer="adam", learning_rate=1.0, num_train_steps=100)
    return ml_collections.ConfigDict({**base, **kw})


def test_schedules_against_formulas():
    cos = make_schedule(_opt_config(schedule="cosine", warmup_steps=10, end_learning_rate_factor=0.1))
    for step in (0, 5, 10, 55, 100):
        want = step / 10 if step < 10 else 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step - 10) / 90))
        np.testing.assert_allclose(cos(step), want, rtol=1e-5, atol=1e-7)
    lin = make_schedule(_opt_config(schedule="linear"))
    np.testing.assert_allclose([lin(0), lin(50), lin(100)], [1.0, 0.5, 0.0], atol=1e-6)
    rsqrt = make_schedule(_opt_config(schedule="rsqrt", warmup_steps=16))
    np.testing.assert_allclose([rsqrt(8), rsqrt(16), rsqrt(64)], [0.5, 1.0, np.sqrt(16 / 64)], rtol=1e-5)
    with pytest.raises(ValueError, match=r"config\.schedule='step'"):
        make_schedule(_opt_config(schedule="step"))
    with pytest.raises(ValueError, match=r"config\.optimizer='rmsprop'"):
        make_optimizer(_opt_config(optimizer="rmsprop"))


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_schedules_equal_optax_own(kind):
    """The traceable schedule against optax's schedules joined as the optimizer used to build them."""
    peak, warmup, total, end = 3e-3, 7, 60, 0.1
    after = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, total - warmup, alpha=end),
        "linear": optax.linear_schedule(peak, peak * end, total - warmup),
    }[kind]
    ref = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])
    ours = make_schedule(
        _opt_config(schedule=kind, learning_rate=peak, warmup_steps=warmup, num_train_steps=total,
                    end_learning_rate_factor=end)
    )  # fmt: skip
    steps = np.arange(0, total + 10)
    np.testing.assert_allclose([ours(s) for s in steps], [ref(s) for s in steps], rtol=2e-5, atol=1e-9)


def test_hyperparameters_stay_float32_under_bfloat16_parameters():
    tx = make_optimizer(_opt_config(optimizer="adamw", b2=0.999, num_train_steps=100_000, warmup_steps=1234))
    params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    state = tx.init(params)
    hp = state.hyperparams
    assert hp["b2"].dtype == jnp.float32 and float(hp["b2"]) == np.float32(0.999)
    assert float(hp["num_train_steps"]) == 100_000 and float(hp["warmup_steps"]) == 1234
    for _ in range(3):
        updates, state = tx.update({"w": jnp.full((4, 4), 0.5, jnp.bfloat16)}, state, params)
    assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))


@pytest.mark.slow
def test_a_restored_state_takes_the_hyperparameters_of_the_new_config():
    params = {"w": jnp.ones((2, 2))}
    old_tx = make_optimizer(_opt_config(learning_rate=0.1, num_train_steps=10, schedule="linear"))
    state = old_tx.init(params)
    for _ in range(4):
        _, state = old_tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    new_tx = make_optimizer(_opt_config(learning_rate=0.5, num_train_steps=100, schedule="linear"))
    resumed = with_hyperparameters_of(state, new_tx.init(params))
    assert int(resumed.count) == 4 and int(resumed.hyperparams["step"]) == int(state.hyperparams["step"])
    np.testing.assert_allclose(resumed.inner_state[0].mu["w"], state.inner_state[0].mu["w"])  # moments kept
    _, after = new_tx.update(jax.tree.map(jnp.ones_like, params), resumed, params)
    np.testing.assert_allclose(learning_rate(after), 0.5 * (1 - 4 / 100), rtol=1e-6)  # the new schedule at step 4


def test_learning_rate_lives_in_the_optimizer_state():
    tx = make_optimizer(_opt_config(schedule="linear", learning_rate=0.5))
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    for expected in (0.5, 0.5, 0.495, 0.49):  # the rate the latest update used (the first step's after init)
        np.testing.assert_allclose(learning_rate(state), expected, rtol=1e-5)
        _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)


def test_weight_decay_mask_and_clipping():
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}
    assert decay_mask(params) == {"kernel": True, "bias": False}
    tx = make_optimizer(_opt_config(optimizer="sgd", momentum=0.0, weight_decay=0.5, learning_rate=1.0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5)  # decayed
    np.testing.assert_allclose(updates["bias"], 0.0)  # not decayed
    tx = make_optimizer(_opt_config(optimizer="sgd", momentum=0.0, grad_clip_norm=1.0))
    updates, _ = tx.update({"kernel": jnp.full((2, 3), 10.0), "bias": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)
    # 0 turns clipping off (clipping to norm 0 would zero every update, silently freezing the model).
    tx = make_optimizer(_opt_config(optimizer="sgd", momentum=0.0, grad_clip_norm=0.0))
    updates, _ = tx.update({"kernel": jnp.full((2, 3), 10.0), "bias": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -10.0 * _opt_config().learning_rate, rtol=1e-6)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        make_optimizer(_opt_config(grad_clip_norm=-1.0))


def _lm_task():
    cfg = TransformerConfig(
        vocab_size=13, emb_dim=16, num_heads=2, num_layers=1, mlp_dim=32, max_len=8, dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )  # fmt: skip
    model = DecoderLM(cfg)

    def loss_fn(params, model_state, batch, rng):
        logits = model.apply({"params": params}, batch["x"][:, :-1])
        loss, aux = cross_entropy(logits, batch["x"][:, 1:])
        return loss, ({"accuracy": aux["accuracy"]}, model_state)

    data = [{"x": jax.random.randint(jax.random.key(i), (16, 8), 1, 13)} for i in range(4)]
    params = jax.jit(model.init)(jax.random.key(0), data[0]["x"])["params"]
    return loss_fn, data, params


@pytest.mark.slow
def test_train_step_is_pure_and_learns():
    loss_fn, data, params = _lm_task()
    tx = make_optimizer(_opt_config(learning_rate=1e-2))
    step = jax.jit(make_train_step(loss_fn, tx))
    runs = []
    for _ in range(2):
        state, losses = TrainState.create(params, tx, jax.random.key(1)), []
        for i in range(12):
            state, metrics = step(state, data[i % 4])
            losses.append(float(metrics["train_loss"]))
        runs.append(losses)
    assert runs[0] == runs[1]  # same seed, same losses, bitwise
    assert runs[0][-1] < runs[0][0] - 0.3 and int(state.step) == 12


@pytest.mark.slow
def test_parallel_modes_agree_on_8_devices():
    assert jax.device_count() == 8
    loss_fn, data, params = _lm_task()
    tx = make_optimizer(_opt_config(optimizer="adamw", learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=1.0))
    results = {}
    for mode, fsdp in (("none", 1), ("pmap", 1), ("jit", 1), ("jit", 4)):
        par = Parallel(mode, fsdp=fsdp, fsdp_min_size=64)
        host = TrainState.create(params, tx, jax.random.key(1))
        state = par.put_state(host)
        step = par.train_step(loss_fn, tx, host)
        losses = []
        for batch in data:
            state, metrics = step(state, par.put_batch(batch))
            losses.append(float(metrics["train_loss"]))
        if fsdp > 1:  # FSDP truly splits the parameters and Adam's moments, and keeps them split
            specs = [x.sharding.spec for x in jax.tree.leaves((state.params, state.opt_state))]
            assert sum("fsdp" in spec for spec in specs) >= 4, specs
            embed = state.params["embed"]["table"]["embedding"]
            assert embed.addressable_shards[0].data.size == embed.size // 4
        results[mode if fsdp == 1 else "fsdp"] = (losses, par.to_host(state.params))
    for mode in ("pmap", "jit", "fsdp"):
        np.testing.assert_allclose(results[mode][0], results["none"][0], rtol=1e-5)
        # Parameters agree to a fraction of one step (lr 1e-2): Adam divides reassociation noise in near-zero
        # gradients by their own tiny scale.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3), results[mode][1], results["none"][1])


def test_parallel_errors():
    with pytest.raises(ValueError, match=r"config\.parallel: 'dp' is unknown"):
        Parallel("dp")
    with pytest.raises(ValueError, match=r"config\.batch_size: 12 is not divisible by the 8 devices"):
        Parallel("jit").check_batch_size(12)
    with pytest.raises(ValueError, match=r"config\.fsdp: 3 does not divide the 8 devices"):
        Parallel("jit", fsdp=3)
    with pytest.raises(ValueError, match=r"config\.fsdp: 2 needs parallel='jit'"):
        Parallel("pmap", fsdp=2)


def test_fsdp_split_rule():
    par = Parallel("jit", fsdp=4, fsdp_min_size=16)
    specs = par.state_shardings({"a": np.zeros((6, 8)), "b": np.zeros((12, 8)), "c": np.zeros(5), "d": np.zeros(8)})
    # the largest dimension that 4 divides; nothing that divides, or too small: replicated
    assert specs["a"].spec == P(None, "fsdp") and specs["b"].spec == P("fsdp")
    assert specs["c"].spec == P() and specs["d"].spec == P()
    assert par.mesh.shape == {"data": 2, "fsdp": 4}
