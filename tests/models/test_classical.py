"""Classical sequence models: the Markov chain against hand counts; every model learns a noisy sine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.models.classical import (
    AutoregressiveModel,
    LatentAutoregressiveModel,
    MarkovModel,
    NaiveModel,
    markov_fit,
    markov_log_likelihood,
    markov_sample,
    predict_ahead,
)
from seqjax.nn.recurrent import LSTMCell


def test_markov_mle_and_log_likelihood_match_hand_counts():
    seq = [0, 1, 1, 2, 0, 1]
    init, trans = markov_fit([seq], 3)
    # Transitions counted by hand: 0→1 twice, 1→1 once, 1→2 once, 2→0 once.
    np.testing.assert_allclose(init, [1, 0, 0])
    np.testing.assert_allclose(trans, [[0, 1, 0], [0, 0.5, 0.5], [1, 0, 0]])
    assert markov_log_likelihood(seq, init, trans) == pytest.approx(2 * np.log(0.5))
    # A state never left gets a uniform row; an impossible transition has log-likelihood -inf.
    init2, trans2 = markov_fit([[0, 1]], 3)
    np.testing.assert_allclose(trans2[2], [1 / 3] * 3)
    assert markov_log_likelihood([1, 0], init2, trans2) == -np.inf
    with pytest.raises(ValueError, match="states in"):
        markov_fit([[0, 3]], 3)


def test_markov_sampling_recovers_the_chain():
    trans = np.array([[0.9, 0.1], [0.3, 0.7]])
    samples = np.asarray(markov_sample(jax.random.key(0), [0.5, 0.5], trans, length=200, num_samples=50))
    assert samples.shape == (50, 200) and set(np.unique(samples)) <= {0, 1}
    _, est = markov_fit(list(samples), 2)
    np.testing.assert_allclose(est, trans, atol=0.03)


def noisy_sine(batch, length, seed):
    r = np.random.default_rng(seed)
    t = np.arange(length)[None, :] + r.integers(0, 1000, size=(batch, 1))
    return (np.sin(2 * np.pi * t / 40) + 0.05 * r.normal(size=(batch, length))).astype(np.float32)


MODELS = {
    "naive": lambda: NaiveModel(max_len=32),
    "autoregressive": lambda: AutoregressiveModel(tau=4),
    "markov": lambda: MarkovModel(),
    "latent (GRU)": lambda: LatentAutoregressiveModel(hidden=16),
    "latent (LSTM)": lambda: LatentAutoregressiveModel(hidden=16, cell_factory=LSTMCell),
}


def noisy_logistic_map(batch, length, seed):
    """x_t = 3.6 x_{t-1} (1 - x_{t-1}) + noise: first-order Markov, and far from x_t = x_{t-1}."""
    r = np.random.default_rng(seed)
    x = np.empty((batch, length))
    x[:, 0] = r.uniform(0.2, 0.8, size=batch)
    for t in range(1, length):
        x[:, t] = np.clip(3.6 * x[:, t - 1] * (1 - x[:, t - 1]) + 0.01 * r.normal(size=batch), 0.0, 1.0)
    return x.astype(np.float32)


# A sine is not first-order Markov in its value (rising and falling pass through the same values), so the Markov
# model is held to a series that is; the others learn the noisy sine.
@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_learns_a_noisy_series(name):
    model = MODELS[name]()
    series = noisy_logistic_map if name == "markov" else noisy_sine
    train, test = series(64, 32, 0), series(64, 32, 1)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes its int32 count with floats
        params = model.init(jax.random.key(0), jnp.asarray(train))
        tx = optax.adam(1e-2)
        opt = tx.init(params)
        loss = lambda p, x: jnp.mean(jnp.square(model.apply(p, x)[:, 4:] - x[:, 4:]))

        @jax.jit
        def step(p, o, x):
            g = jax.grad(loss)(p, x)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o

        for _ in range(400):
            params, opt = step(params, opt, jnp.asarray(train))
        mse = float(loss(params, jnp.asarray(test)))
    last_value = float(np.mean(np.square(test[:, 3:-1] - test[:, 4:])))  # predict x_t = x_{t-1}
    assert mse < 0.6 * last_value, (mse, last_value)
    ahead = predict_ahead(model, params, jnp.asarray(test[:, :16]), k=5)
    assert ahead.shape == (64, 5) and np.isfinite(np.asarray(ahead)).all()
    # The first forecast step is a one-step prediction: close to the truth.
    assert float(np.mean(np.abs(np.asarray(ahead[:, 0]) - test[:, 16]))) < 0.2


def test_models_see_only_the_past():
    x = jnp.asarray(noisy_sine(2, 10, 2))
    for make in MODELS.values():
        model = make()
        params = model.init(jax.random.key(1), x)
        jac = np.asarray(jax.jacrev(lambda s, model=model, params=params: model.apply(params, s))(x))  # [B,T,B,T]
        for t in range(10):
            assert np.all(jac[:, t, :, t:] == 0.0), type(model).__name__


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_len=8"):
        NaiveModel(max_len=8).init(jax.random.key(0), jnp.zeros((2, 9)))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        MarkovModel().init(jax.random.key(0), jnp.zeros((2, 9, 1)))
    with pytest.raises(ValueError, match="tau"):
        AutoregressiveModel(tau=0).init(jax.random.key(0), jnp.zeros((2, 9)))
