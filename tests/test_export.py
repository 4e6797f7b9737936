"""`jax.export` of seqjax's models: on CPU with the C++ kernels active, and for accelerators from this CPU host.

The C++ kernels' custom calls cannot be serialized (they have no compatibility guarantee); a program lowered by
`jax.export` gets their JAX formulation instead (seqjax/kernels/cpu/portable.py). Exporting for ("cuda", "tpu") is
how CI checks the accelerator paths without an accelerator: the lowered module must hold no seqjax custom call and
must compute attention the way the layer does off CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.kernels import common
from seqjax.kernels import cpu as _native
from seqjax.models import (
    VQVAE,
    DecoderLM,
    ImageDecoderConfig,
    ImageTokenDecoder,
    RecurrentLM,
    RecurrentLMConfig,
    Transformer,
    TransformerConfig,
    ViT,
    ViTConfig,
    VQVAEConfig,
)
from seqjax.models.classical import AutoregressiveModel, LatentAutoregressiveModel, MarkovModel, NaiveModel
from seqjax.nn import GRU, LSTM, SimpleRNN

_SEQJAX_CALL = re.compile(r"custom_call\s*@seqjax")


def _roundtrip(exported):
    """Serialized and read back where flatbuffers (jax.export's serializer) is installed."""
    if importlib.util.find_spec("flatbuffers") is None:
        return exported
    return jax.export.deserialize(exported.serialize())


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.fixture
def single_device(monkeypatch):
    monkeypatch.setattr(common, "single_device", lambda: True)


@pytest.fixture
def kernels_active(monkeypatch):
    """A one-device process, as a user's (the test process has 8 CPU devices): the C++ kernels run where they apply."""
    if not _native.available():
        if os.environ.get("CI"):
            pytest.fail(f"CPU kernels unavailable under CI: {_native.unavailable_reason()}")
        pytest.skip(f"CPU kernels unavailable: {_native.unavailable_reason()}")
    monkeypatch.setattr(common, "single_device", lambda: True)


def _logits_loss(logits, targets):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))


# ---------------------------------------------------------------------------------------------------------------
# CPU, kernels active: export works and computes what the kernels compute.
# ---------------------------------------------------------------------------------------------------------------


def _decoder_lm(t=512):
    config = TransformerConfig(vocab_size=32, emb_dim=32, num_heads=2, num_layers=1, mlp_dim=64, max_len=t)
    model = DecoderLM(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, t)), jnp.int32)
    return model, model.init(jax.random.key(0), tokens)["params"], tokens


def _recurrent_lm(cell):
    model = RecurrentLM(RecurrentLMConfig(vocab_size=16, emb_dim=16, hidden_size=32, num_layers=2, cell=cell))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 16, (4, 24)), jnp.int32)
    return model, model.init(jax.random.key(0), tokens)["params"], tokens


@pytest.mark.slow
@pytest.mark.parametrize("build", [pytest.param(_decoder_lm, marks=pytest.mark.slow),
                                   pytest.param(lambda: _recurrent_lm("lstm"), marks=pytest.mark.slow),
                                   lambda: _recurrent_lm("gru")],
                         ids=["decoder_lm_T512", "lstm_lm", "gru_lm"])  # fmt: skip
def test_cpu_export_with_kernels_active(kernels_active, build):
    model, params, tokens = build()

    def forward(params, tokens):
        out = model.apply({"params": params}, tokens)
        return out[0] if isinstance(out, tuple) else out

    def loss(params, tokens):
        return _logits_loss(forward(params, tokens)[:, :-1], tokens[:, 1:])

    for f in (jax.jit(forward), jax.jit(jax.value_and_grad(loss))):
        # Precondition: the program run here calls the C++ kernels (else this test would prove nothing).
        assert _SEQJAX_CALL.search(f.lower(params, tokens).as_text()), "the C++ kernels are not used"
        exported = jax.export.export(f)(params, tokens)
        assert not _SEQJAX_CALL.search(exported.mlir_module())
        _close(_roundtrip(exported).call(params, tokens), f(params, tokens))


def test_cpu_export_under_vmap(kernels_active):
    """The kernels' batching rule: a vmapped model exports (and computes) like the unbatched one."""
    model, params, tokens = _recurrent_lm("lstm")
    f = jax.jit(jax.vmap(lambda t: model.apply({"params": params}, t)[0]))
    batch = jnp.stack([tokens, tokens[::-1]])
    assert _SEQJAX_CALL.search(f.lower(batch).as_text())
    _close(_roundtrip(jax.export.export(f)(batch)).call(batch), f(batch))


# ---------------------------------------------------------------------------------------------------------------
# cuda and tpu, exported from this host: every experiment's model's training step.
# ---------------------------------------------------------------------------------------------------------------


def _tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, shape), jnp.int32)


def _transformer_config(**kw):
    return TransformerConfig(vocab_size=16, emb_dim=16, num_heads=2, num_layers=1, mlp_dim=32, max_len=16, **kw)


class _RecurrentPredictor(nn.Module):
    """experiments/sequence_models.py's predictor: a stacked recurrent layer over x_{t-1}, then a linear read-out."""

    layer: type

    @nn.compact
    def __call__(self, x):
        h, _ = self.layer(8)(jnp.pad(x, ((0, 0), (1, 0)))[:, :-1, None])
        return nn.Dense(1)(h)[..., 0]


def _regression(model):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12)), jnp.float32)
    return model, (x,), lambda out, x: jnp.mean((out - x) ** 2), {}


def _cases():
    """name -> (model, apply args, loss(model output, *args), apply kwargs), as each experiment trains it."""
    text, image = _tokens((2, 4), 8), _tokens((2, 4), 6, 1)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    lm_tokens, src, tgt = _tokens((2, 16), 16), _tokens((2, 12), 16), _tokens((2, 10), 16, 1)
    return {
        "decoder_lm": (DecoderLM(_transformer_config(dropout_rate=0.1)), (lm_tokens,),
                       lambda out, t: _logits_loss(out[:, :-1], t[:, 1:]), {"deterministic": False}),
        "transformer": (Transformer(_transformer_config()), (src, tgt), lambda out, s, t: _logits_loss(out, t), {}),
        "vit": (ViT(ViTConfig(num_classes=3, image_size=8, patch_size=4, emb_dim=16, num_layers=1, mlp_dim=32,
                              num_heads=2, dropout_rate=0.0, attention_dropout_rate=0.0)),
                (images,), lambda out, x: jnp.mean(out**2), {}),
        "vqvae": (VQVAE(VQVAEConfig(num_codes=8, code_dim=4, channels=8, num_downsamples=1)), (images,),
                  lambda out, x: out[0][1]["loss"], {"train": True, "mutable": ["vq"]}),
        "image_decoder": (ImageTokenDecoder(ImageDecoderConfig(text_vocab_size=8, image_vocab_size=6, text_len=4,
                                                               image_grid=(2, 2), emb_dim=16, num_heads=2,
                                                               num_layers=1, mlp_dim=32, dropout_rate=0.0,
                                                               attention_dropout_rate=0.0)),
                          (text, image), lambda out, *a: out[0], {"method": "loss"}),
        **{f"recurrent_lm_{cell}": (RecurrentLM(RecurrentLMConfig(vocab_size=16, emb_dim=8, hidden_size=8,
                                                                  num_layers=2, cell=cell)),
                                    (lm_tokens,), lambda out, t: _logits_loss(out[0][:, :-1], t[:, 1:]), {})
           for cell in ("lstm", "gru", "rnn")},
        **{f"sequence_{layer.__name__}": _regression(_RecurrentPredictor(layer)) for layer in (LSTM, GRU, SimpleRNN)},
        "naive": _regression(NaiveModel(max_len=12, hidden=8)),
        "autoregressive": _regression(AutoregressiveModel(tau=3, hidden=8)),
        "markov": _regression(MarkovModel(hidden=8)),
        "latent_ar": _regression(LatentAutoregressiveModel(hidden=8)),
    }  # fmt: skip


def _training_step(name):
    """jit(value_and_grad(loss)) of the model's parameters, and its arguments."""
    model, args, loss_of, kwargs = _cases()[name]
    variables = model.init(jax.random.key(0), *args, **{k: v for k, v in kwargs.items() if k == "method"})
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(params, rng, *args):
        out = model.apply({"params": params, **rest}, *args, rngs={"dropout": rng, "vq": rng}, **kwargs)
        return loss_of(out, *args)

    return jax.jit(jax.value_and_grad(loss)), (params, jax.random.key(1), *args)


_SLOW = ("transformer", "vit", "vqvae", "image_decoder")  # 7-12 s each on a busy 2-core machine


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in sorted(_cases())]
)
def test_accelerator_export_of_training_steps(name, single_device):
    # One device: traced where the C++ kernels would run on this CPU (the case that must not leak into the module).
    step, args = _training_step(name)
    exported = jax.export.export(step, platforms=("cuda", "tpu"))(*args)
    module = exported.mlir_module()
    assert exported.platforms == ("cuda", "tpu")
    assert not _SEQJAX_CALL.search(module), "a CPU kernel's custom call was lowered for an accelerator"
    if "attention" in name or name in ("decoder_lm", "transformer", "vit", "image_decoder"):
        # Attention in XLA ops: "auto" is jax.nn.dot_product_attention off CPU, whose cuDNN form can only be traced
        # on an NVIDIA GPU, so a module exported from a CPU host holds its XLA form (tests/kernels/test_registry.py).
        assert "stablehlo.dot_general" in module and "stablehlo.exponential" in module
        assert "cudnn" not in module
