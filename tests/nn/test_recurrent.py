"""Recurrent cells and the scan wrapper against numpy equations, flax's built-in cells, torch's cells, autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from seqjax.nn.recurrent import RNN, GRUCell, LSTMCell, SimpleRNNCell, flip_sequences

F, H = 3, 4


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_step(kind, p, carry, x):
    """The cell equations written out in numpy, gates in PyTorch's order."""
    xi = x @ p["input"]["kernel"] + p["input"]["bias"]
    h = carry[1] if kind == "lstm" else carry
    hh = h @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    if kind in ("tanh", "relu"):
        new = np.tanh(xi + hh) if kind == "tanh" else np.maximum(xi + hh, 0.0)
        return new, new
    if kind == "lstm":
        i, f, g, o = np.split(xi + hh, 4, axis=-1)
        c = sigmoid(f) * carry[0] + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        return (c, h), h
    xr, xz, xn = np.split(xi, 3, axis=-1)
    hr, hz, hn = np.split(hh, 3, axis=-1)
    r, z = sigmoid(xr + hr), sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)
    new = (1 - z) * n + z * h
    return new, new


def make(kind, **kw):
    return {
        "tanh": lambda: SimpleRNNCell(H, **kw),
        "relu": lambda: SimpleRNNCell(H, activation="relu", **kw),
        "lstm": lambda: LSTMCell(H, **kw),
        "gru": lambda: GRUCell(H, **kw),
    }[kind]()


def random_params(cell, seed, batch=(2,)):
    """Initialised parameters with every bias made nonzero, as numpy float64."""
    r = np.random.default_rng(seed)
    carry = cell.initialize_carry(jax.random.key(0), (*batch, F))
    params = cell.init(jax.random.key(seed), carry, jnp.zeros((*batch, F)))["params"]
    return jax.tree.map(lambda a: np.asarray(a, np.float64) + 0.3 * r.normal(size=a.shape), params)


def random_carry(kind, seed, batch=(2,)):
    r = np.random.default_rng(seed)
    if kind == "lstm":
        return r.normal(size=(*batch, H)), r.normal(size=(*batch, H))
    return r.normal(size=(*batch, H))


KINDS = ["tanh", "relu", "lstm", "gru"]


@pytest.mark.parametrize("kind", KINDS)
def test_cell_step_matches_numpy_equations(kind):
    cell = make(kind)
    p = random_params(cell, 1, batch=(2, 3))
    carry = random_carry(kind, 2, batch=(2, 3))
    x = np.random.default_rng(3).normal(size=(2, 3, F))
    new, y = cell.apply({"params": p}, jax.tree.map(jnp.asarray, carry), jnp.asarray(x))
    ref_new, ref_y = np_step(kind, p, carry, x)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref_new), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)


def _flax_to_ours(kind, fp):
    cat = lambda names, field: np.concatenate([np.asarray(fp[n][field]) for n in names], axis=-1)
    zeros = lambda n: np.zeros(n, np.float32)
    if kind == "lstm":
        return {
            "input": {"kernel": cat(["ii", "if", "ig", "io"], "kernel"), "bias": zeros(4 * H)},
            "hidden": {
                "kernel": cat(["hi", "hf", "hg", "ho"], "kernel"),
                "bias": cat(["hi", "hf", "hg", "ho"], "bias"),
            },
        }
    if kind == "gru":
        return {
            "input": {"kernel": cat(["ir", "iz", "in"], "kernel"), "bias": cat(["ir", "iz", "in"], "bias")},
            "hidden": {
                "kernel": cat(["hr", "hz", "hn"], "kernel"),
                "bias": np.concatenate([zeros(2 * H), np.asarray(fp["hn"]["bias"])]),
            },
        }
    return {
        "input": {"kernel": np.asarray(fp["i"]["kernel"]), "bias": np.asarray(fp["i"]["bias"])},
        "hidden": {"kernel": np.asarray(fp["h"]["kernel"]), "bias": zeros(H)},
    }


@pytest.mark.parametrize("kind", ["tanh", "lstm", "gru"])
def test_cells_match_flax_builtins_with_mapped_weights(kind):
    theirs = {"tanh": nn.SimpleCell(H), "lstm": nn.LSTMCell(H), "gru": nn.GRUCell(H)}[kind]
    x = jax.random.normal(jax.random.key(4), (2, F))
    carry = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), random_carry(kind, 5))
    fp = theirs.init(jax.random.key(6), carry, x)["params"]
    fp = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape), fp)  # nonzero biases
    (c1, y1), (c2, y2) = (
        make(kind).apply({"params": _flax_to_ours(kind, fp)}, carry, x),
        theirs.apply({"params": fp}, carry, x),
    )
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cells_match_torch_cells(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tcell = {
        "tanh": lambda: torch.nn.RNNCell(F, H, nonlinearity="tanh"),
        "relu": lambda: torch.nn.RNNCell(F, H, nonlinearity="relu"),
        "lstm": lambda: torch.nn.LSTMCell(F, H),
        "gru": lambda: torch.nn.GRUCell(F, H),
    }[kind]()
    sd = {k: v.detach().numpy() for k, v in tcell.state_dict().items()}
    params = {
        "input": {"kernel": sd["weight_ih"].T, "bias": sd["bias_ih"]},
        "hidden": {"kernel": sd["weight_hh"].T, "bias": sd["bias_hh"]},
    }
    x = np.random.default_rng(8).normal(size=(2, F)).astype(np.float32)
    carry = jax.tree.map(lambda a: a.astype(np.float32), random_carry(kind, 9))
    _, y = make(kind).apply({"params": params}, jax.tree.map(jnp.asarray, carry), jnp.asarray(x))
    if kind == "lstm":  # torch's LSTMCell state is (h, c); ours is (c, h)
        ref = tcell(torch.from_numpy(x), (torch.from_numpy(carry[1]), torch.from_numpy(carry[0])))[0]
    else:
        ref = tcell(torch.from_numpy(x), torch.from_numpy(carry))
    np.testing.assert_allclose(np.asarray(y), ref.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_lstm_forget_bias():
    p = LSTMCell(H, forget_bias=1.0).init(
        jax.random.key(0), LSTMCell(H).initialize_carry(None, (2, F)), jnp.zeros((2, F))
    )
    b_in, b_hid = np.asarray(p["params"]["input"]["bias"]), np.asarray(p["params"]["hidden"]["bias"])
    np.testing.assert_array_equal(b_in, np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])
    np.testing.assert_array_equal(b_hid, 0.0)


# ------------------------------------------------------------------------------------------------------------- RNN


def _loop(kind, p, x, carry):
    ys = []
    for t in range(x.shape[1]):
        carry, y = np_step(kind, p, carry, x[:, t])
        ys.append(y)
    return carry, (np.stack(ys, 1) if ys else np.zeros((x.shape[0], 0, H)))


@pytest.mark.parametrize("kind", KINDS)
def test_rnn_equals_a_python_loop_of_the_cell(kind):
    rnn = RNN(make(kind), return_carry=True)
    x = np.random.default_rng(10).normal(size=(2, 6, F))
    p = random_params(make(kind), 11)
    carry0 = random_carry(kind, 12)
    carry, ys = rnn.apply({"params": {"cell": p}}, jnp.asarray(x), initial_carry=jax.tree.map(jnp.asarray, carry0))
    ref_carry, ref_ys = _loop(kind, p, x, carry0)
    np.testing.assert_allclose(np.asarray(ys), ref_ys, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(ref_carry), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_seq_lengths_and_reverse_within_lengths(kind, reverse):
    lengths = np.array([6, 3, 0, 1])
    x = np.random.default_rng(13).normal(size=(4, 6, F))
    p = random_params(make(kind), 14)
    rnn = RNN(make(kind), return_carry=True, reverse=reverse)
    carry, ys = rnn.apply({"params": {"cell": p}}, jnp.asarray(x), seq_lengths=jnp.asarray(lengths))
    zero = random_carry(kind, 0, batch=(1,))
    zero = jax.tree.map(np.zeros_like, zero)
    for b, n in enumerate(lengths):
        seq = x[b : b + 1, :n]
        ref_carry, ref_ys = _loop(kind, p, seq[:, ::-1] if reverse else seq, zero)
        if reverse:
            ref_ys = ref_ys[:, ::-1]
        np.testing.assert_allclose(np.asarray(ys[b, :n]), ref_ys[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0.0)  # nothing past the length
        for a, r in zip(jax.tree.leaves(carry), jax.tree.leaves(ref_carry), strict=True):
            np.testing.assert_allclose(np.asarray(a[b]), r[0], rtol=1e-5, atol=1e-5)


def test_flip_sequences_reverses_within_lengths():
    x = jnp.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(np.asarray(flip_sequences(x, jnp.array([5, 3]))), [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]])


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("kind", ["lstm", "gru", "tanh"])
def test_rnn_gradients_float64(kind, x64):
    x = np.random.default_rng(15).normal(size=(3, 5, F))
    rnn = RNN(make(kind, param_dtype=jnp.float64))
    params = rnn.init(jax.random.key(16), x)
    f = jax.jit(lambda p, x: rnn.apply(p, x, seq_lengths=jnp.array([5, 2, 4])))
    check_grads(f, (params, x), order=1, modes=["rev"])


@pytest.mark.slow
def test_rnn_bf16_compute():
    x = jax.random.normal(jax.random.key(17), (2, 4, F))
    rnn = RNN(LSTMCell(H, dtype=jnp.bfloat16))
    p = rnn.init(jax.random.key(18), x)
    y = rnn.apply(p, x)
    assert y.dtype == jnp.bfloat16
    ref = RNN(LSTMCell(H)).apply(p, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.05)


def test_bad_inputs_raise_clear_errors():
    rnn = RNN(LSTMCell(H))
    x = jnp.zeros((2, 5, F))
    params = rnn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\[0, T=5\]"):
        rnn.apply(params, x, seq_lengths=jnp.array([6, 2]))
    with pytest.raises(ValueError, match=r"\[0, T=5\]"):
        rnn.apply(params, x, seq_lengths=jnp.array([-1, 2]))
    with pytest.raises(ValueError, match=r"shape \[B\] = \(2,\)"):
        rnn.apply(params, x, seq_lengths=jnp.array([5, 2, 1]))
    with pytest.raises(ValueError, match=r"\[B, T, F\]"):
        rnn.apply(params, jnp.zeros((5, F)))
    with pytest.raises(ValueError, match="initial_carry"):
        rnn.apply(params, x, initial_carry=(jnp.zeros((2, H + 1)), jnp.zeros((2, H + 1))))
    with pytest.raises(Exception, match=r"\(5, 16\)|\(3, 16\)"):  # flax names the kernel shapes it expected and got
        rnn.apply(params, jnp.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="carry"):
        GRUCell(H).init(jax.random.key(0), jnp.zeros((3, H)), jnp.zeros((2, F)))
    with pytest.raises(ValueError, match="activation"):
        SimpleRNNCell(H, activation="sigmoid").init(jax.random.key(0), jnp.zeros((2, H)), jnp.zeros((2, F)))


@pytest.mark.slow
def test_bidirectional_concatenates_forward_and_reverse_within_lengths():
    from seqjax.nn import Bidirectional

    x = jnp.asarray(np.random.default_rng(19).normal(size=(2, 5, F)).astype(np.float32))
    lengths = jnp.array([5, 3])
    bi = Bidirectional(RNN(GRUCell(H)), RNN(GRUCell(H), reverse=True), return_carry=True)
    variables = bi.init(jax.random.key(0), x, seq_lengths=lengths)
    (cf, cb), out = bi.apply(variables, x, seq_lengths=lengths)
    assert jax.tree.map(jnp.shape, (cf, cb)) == ((2, H), (2, H))
    assert out.shape == (2, 5, 2 * H)
    p = variables["params"]
    fwd = RNN(GRUCell(H)).apply({"params": p["forward_rnn"]}, x, seq_lengths=lengths)
    bwd = RNN(GRUCell(H), reverse=True).apply({"params": p["backward_rnn"]}, x, seq_lengths=lengths)
    np.testing.assert_allclose(np.asarray(out), np.concatenate([fwd, bwd], -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reverse=True"):
        Bidirectional(RNN(GRUCell(H)), RNN(GRUCell(H))).init(jax.random.key(0), x)


class _DropoutCell(nn.Module):
    """A cell whose output is its input after dropout: shows the mask each step draws."""

    @nn.compact
    def __call__(self, carry, x):
        return carry, nn.Dropout(0.5)(x, deterministic=not self.has_rng("dropout"))

    def initialize_carry(self, rng, input_shape):
        return jnp.zeros((*input_shape[:-1], 1))


def test_rnn_dropout_differs_per_step_and_is_off_at_inference():
    x = jnp.ones((1, 8, 64))
    rnn = RNN(_DropoutCell())
    variables = rnn.init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(rnn.apply(variables, x)), 1.0)  # no dropout rng: inference
    y = np.asarray(rnn.apply(variables, x, rngs={"dropout": jax.random.key(1)}))
    masks = y[0] != 0
    assert 0.3 < masks.mean() < 0.7
    assert len({m.tobytes() for m in masks}) == 8  # a different mask at every step


def _fused_calls(monkeypatch):
    """Counts the calls of the fused LSTM and GRU kernels made through RNN (the registry's layer functions)."""
    from seqjax.kernels import registry as recurrent

    calls = []
    for name in ("fused_lstm", "fused_gru"):
        real = getattr(recurrent, name)
        monkeypatch.setattr(recurrent, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fused_kernel_equals_the_scanned_cell(monkeypatch, kind, reverse, use_bias):
    """RNN(LSTMCell / GRUCell) without lengths runs `fused_lstm` / `fused_gru`; outputs, final carry and every
    gradient (parameters, inputs, initial carry) equal the nn.scan path's."""
    calls = _fused_calls(monkeypatch)
    r = np.random.default_rng(20)
    x = jnp.asarray(r.normal(size=(3, 7, F)), jnp.float32)
    carry0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), random_carry(kind, 21, batch=(3,)))
    cell = LSTMCell(H, use_bias=use_bias, forget_bias=1.0) if kind == "lstm" else GRUCell(H, use_bias=use_bias)
    fused, plain = (RNN(cell, reverse=reverse, return_carry=True, fused=f) for f in (True, False))
    params = plain.init(jax.random.key(22), x)
    params = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(r.normal(size=a.shape), a.dtype), params)
    weights = jnp.asarray(r.normal(size=(3, 7, H)), jnp.float32)

    def loss(rnn, p, x, carry0):
        carry, ys = rnn.apply(p, x, initial_carry=carry0)
        c, h = carry if kind == "lstm" else (carry, carry)
        return jnp.sum(ys * weights) + jnp.sum(jnp.sin(c)) + jnp.sum(h * h)

    assert calls == []
    got = jax.value_and_grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(params, x, carry0)
    assert calls == [f"fused_{kind}"]
    want = jax.value_and_grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(params, x, carry0)
    assert len(calls) == 1
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    assert jax.tree.structure(fused.init(jax.random.key(22), x)) == jax.tree.structure(params)


@pytest.mark.slow
def test_fused_kernels_gradients_float64(x64):
    from seqjax.nn.recurrent import fused_gru, fused_lstm

    r = np.random.default_rng(23)
    b, t = 2, 5
    lstm = [r.normal(size=s) for s in [(b, t, F), (b, H), (b, H), (F, 4 * H), (H, 4 * H), (4 * H,)]]
    gru = [r.normal(size=s) for s in [(b, t, F), (b, H), (F, 3 * H), (H, 3 * H), (3 * H,), (3 * H,)]]

    def f_lstm(*a):  # outputs and the final carry, so that every cotangent path is checked
        ys, (c, h) = fused_lstm(*a)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(c * h)

    def f_gru(*a):
        ys, h = fused_gru(*a)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(h * h)

    check_grads(f_lstm, lstm, order=1, modes=["rev"])
    check_grads(f_gru, gru, order=1, modes=["rev"])


@pytest.mark.slow
def test_fused_path_is_not_taken_where_it_would_differ(monkeypatch):
    calls = _fused_calls(monkeypatch)
    x = jnp.ones((2, 4, F))
    for rnn, kw in [
        (RNN(LSTMCell(H)), {"seq_lengths": jnp.array([4, 2])}),
        (RNN(LSTMCell(H, dtype=jnp.bfloat16)), {}),
        (
            RNN(
                LSTMCell(
                    H, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, recurrent_kernel_init=nn.initializers.normal()
                )
            ),
            {},
        ),
        (RNN(LSTMCell(H), unroll=2), {}),
        (RNN(GRUCell(H)), {"seq_lengths": jnp.array([4, 2])}),
        (RNN(SimpleRNNCell(H)), {}),
        (RNN(GRUCell(H, dtype=jnp.bfloat16)), {}),
        (RNN(GRUCell(H), unroll=2), {}),
    ]:
        xb = x.astype(rnn.cell.param_dtype)
        rnn.apply(rnn.init(jax.random.key(0), xb, **kw), xb, **kw)
    assert calls == []
    # parameters handed over in another dtype than the declared one: the scanned path, whose gradient works
    rnn = RNN(LSTMCell(H))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), rnn.init(jax.random.key(0), x))
    calls.clear()  # init took the fused path (float32 parameters)
    with jax.numpy_dtype_promotion("standard"):  # as flax's Dense promotes them
        grads = jax.grad(lambda p: jnp.sum(rnn.apply(p, x).astype(jnp.float32)))(params)
    assert calls == [] and all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_stacked_layers_forward_mode_autodiff_with_fused_off(kind):
    from seqjax.nn import GRU, LSTM

    x = jnp.asarray(np.random.default_rng(24).normal(size=(2, 3, F)), jnp.float32)
    layer = (LSTM if kind == "lstm" else GRU)(H, num_layers=2, bidirectional=True)
    params = layer.init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="custom_vjp"):  # the fused kernel has no forward-mode rule
        jax.jacfwd(lambda x: layer.apply(params, x)[0])(x)
    plain = layer.clone(fused=False)
    fwd = jax.jacfwd(lambda x: plain.apply(params, x)[0])(x)
    rev = jax.jacrev(lambda x: layer.apply(params, x)[0])(x)
    np.testing.assert_allclose(np.asarray(fwd), np.asarray(rev), rtol=1e-5, atol=1e-6)
