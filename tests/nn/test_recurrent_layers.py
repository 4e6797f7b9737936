"""Stacked LSTM / GRU / SimpleRNN against torch.nn.LSTM / GRU / RNN (packed sequences), through our loaders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.interop.torch import load_gru, load_lstm, load_rnn
from seqjax.nn import GRU, LSTM, SimpleRNN

F, H, B, T = 3, 4, 3, 6

torch = pytest.importorskip("torch")

KINDS = {
    "lstm": (lambda **kw: torch.nn.LSTM(F, H, batch_first=True, **kw), LSTM, load_lstm),
    "gru": (lambda **kw: torch.nn.GRU(F, H, batch_first=True, **kw), GRU, load_gru),
    "rnn": (lambda **kw: torch.nn.RNN(F, H, batch_first=True, **kw), SimpleRNN, load_rnn),
}


def torch_forward(module, x, lengths, kind):
    """torch with packed sequences, padded back to T; returns outputs and the final state as numpy."""
    xt = torch.from_numpy(x).requires_grad_(True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
    )
    out, state = module(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return xt, out, state


@pytest.mark.slow_beyond(3)
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True), (3, False)])
def test_stacked_layers_match_torch_with_packed_sequences(kind, num_layers, bidirectional):
    torch.manual_seed(0)
    make_torch, ours_cls, load = KINDS[kind]
    tm = make_torch(num_layers=num_layers, bidirectional=bidirectional)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    variables = load(sd, num_layers=num_layers, bidirectional=bidirectional)
    ours = ours_cls(H, num_layers=num_layers, bidirectional=bidirectional)
    assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(0), jnp.zeros((B, T, F))))

    x = np.random.default_rng(1).normal(size=(B, T, F)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    xt, tout, tstate = torch_forward(tm, x, lengths, kind)
    out, state = ours.apply(variables, jnp.asarray(x), seq_lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(out), tout.detach().numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state), tstate if kind == "lstm" else [tstate], strict=True):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-5, atol=1e-5)

    # Input gradients of <out, cotangent> agree too.
    cot = np.random.default_rng(2).normal(size=out.shape).astype(np.float32)
    (tout * torch.from_numpy(cot)).sum().backward()
    grad = jax.grad(lambda x: jnp.sum(ours.apply(variables, x, seq_lengths=jnp.asarray(lengths))[0] * cot))(
        jnp.asarray(x)
    )
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_initial_state_matches_torch():
    torch.manual_seed(3)
    tm = torch.nn.LSTM(F, H, num_layers=2, batch_first=True)
    variables = load_lstm({k: v.detach().numpy() for k, v in tm.state_dict().items()}, num_layers=2)
    x = np.random.default_rng(4).normal(size=(B, T, F)).astype(np.float32)
    h0, c0 = (np.random.default_rng(s).normal(size=(2, B, H)).astype(np.float32) for s in (5, 6))
    tout, (th, tc) = tm(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    out, (h, c) = LSTM(H, num_layers=2).apply(variables, jnp.asarray(x), initial_state=(h0, c0))
    np.testing.assert_allclose(np.asarray(out), tout.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), th.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(c), tc.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dropout_between_layers_only_in_training():
    layer = GRU(H, num_layers=2, dropout=0.5)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(B, T, F)).astype(np.float32))
    variables = layer.init(jax.random.key(0), x)
    a, _ = layer.apply(variables, x)
    b, _ = layer.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c, _ = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    d, _ = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(np.asarray(c), np.asarray(a)) and not np.allclose(np.asarray(c), np.asarray(d))


def test_loader_and_layer_errors():
    torch.manual_seed(8)
    sd = {k: v.detach().numpy() for k, v in torch.nn.LSTM(F, H, num_layers=2).state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected keys.*weight_ih_l1"):
        load_lstm(sd, num_layers=1)
    with pytest.raises(ValueError, match=r"missing keys.*weight_ih_l2"):
        load_lstm(sd, num_layers=3)
    with pytest.raises(ValueError, match="not a multiple of 3 gates"):
        load_gru({k: v for k, v in sd.items() if k.endswith("l0")})
    with pytest.raises(ValueError, match=r"initial_state must be \(h_0, c_0\)"):
        LSTM(H).init(jax.random.key(0), jnp.zeros((B, T, F)), initial_state=jnp.zeros((1, B, H)))
    with pytest.raises(ValueError, match="dropout"):
        GRU(H, dropout=1.5).init(jax.random.key(0), jnp.zeros((B, T, F)))
