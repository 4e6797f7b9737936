"""DALL-E-style decoder: causality over the stream, cached generation = full pass, guidance, loss weights, and a tiny
text-to-image model whose pictures match their captions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax import decoding
from seqjax.models import get_model
from seqjax.models.image_decoder import ImageDecoderConfig, ImageStep, ImageTokenDecoder, image_prompt, image_state
from seqjax.models.vqvae import VQVAEConfig
from seqjax.plotting import plot_image_grid
from tests.models.squares import quadrant_squares


def _config(**overrides):
    base = dict(
        text_vocab_size=7, image_vocab_size=11, text_len=4, image_grid=(2, 3), emb_dim=16, num_heads=2, num_layers=2,
        mlp_dim=32, dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip
    return ImageDecoderConfig(**{**base, **overrides})


def _setup(rng, **overrides):
    model = ImageTokenDecoder(_config(**overrides))
    text = jax.random.randint(rng, (2, 4), 1, 7)
    image = jax.random.randint(jax.random.fold_in(rng, 1), (2, 6), 0, 11)
    params = jax.jit(model.init)(rng, text, image)["params"]
    return model, params, text, image


@pytest.mark.slow
def test_changing_text_or_earlier_image_tokens_changes_nothing_before(rng):
    model, params, text, image = _setup(rng)
    apply = jax.jit(lambda t, i: model.apply({"params": params}, t, i))
    text_logits, image_logits = apply(text, image)
    # Image token j is predicted at output j; changing image token j must leave outputs 0..j bitwise unchanged.
    for j in range(5):
        changed = image.at[:, j].set((image[:, j] + 1) % 11)
        t2, i2 = apply(text, changed)
        np.testing.assert_array_equal(i2[:, : j + 1], image_logits[:, : j + 1])
        np.testing.assert_array_equal(t2, text_logits)
        assert not np.allclose(i2[:, j + 1 :], image_logits[:, j + 1 :])
    # Changing the last text token changes every image prediction but no earlier text prediction.
    t2, i2 = apply(text.at[:, 3].set(text[:, 3] % 6 + 1), image)
    np.testing.assert_array_equal(t2, text_logits)  # outputs 0..2 see text 0..2 only
    assert not np.allclose(i2[:, 0], image_logits[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_cached_generation_equals_full_recompute(rng, scan):
    model, params, text, image = _setup(rng, scan_layers=scan)
    if scan:
        from seqjax.models.transformer import stack_layers

        params = stack_layers(jax.jit(ImageTokenDecoder(_config()).init)(rng, text, image)["params"])
    _, full = model.apply({"params": params}, text, image)
    step = jax.jit(ImageStep(model))
    logits, state = step(image_state(model, params, 2), image_prompt(model, text))
    np.testing.assert_allclose(logits[:, -1], full[:, 0], rtol=1e-5, atol=1e-5)
    for j in range(5):
        logits, state = step(state, image[:, j : j + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, j + 1], rtol=1e-5, atol=1e-5)
    # And greedy generation reproduces the argmax chain of full passes.
    tokens = decoding.greedy(ImageStep(model), image_state(model, params, 2), image_prompt(model, text), 6)
    _, again = model.apply({"params": params}, text, tokens)
    np.testing.assert_array_equal(np.argmax(again, -1), tokens)


@pytest.mark.slow
def test_classifier_free_guidance_mixes_logits(rng):
    model, params, text, _ = _setup(rng)
    prompt = image_prompt(model, text)
    cond, _ = ImageStep(model)(image_state(model, params, 2), prompt)
    uncond, _ = ImageStep(model)(image_state(model, params, 2), image_prompt(model, jnp.zeros_like(text)))
    for scale in (0.0, 1.0, 3.0):
        guided, _ = ImageStep(model)(image_state(model, params, 2, guidance_scale=scale), prompt)
        np.testing.assert_allclose(guided, uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_loss_weights_text_and_image(rng):
    model, params, text, image = _setup(rng)
    text_logits, image_logits = model.apply({"params": params}, text, image)
    for w in (7 / 8, 0.5):
        m = ImageTokenDecoder(_config(image_loss_weight=w))
        loss, aux = m.apply({"params": params}, text, image, method="loss")
        logp_t = jax.nn.log_softmax(text_logits)
        text_nll = -np.take_along_axis(np.asarray(logp_t), np.asarray(text[:, 1:, None]), -1).mean()
        logp_i = jax.nn.log_softmax(image_logits)
        image_nll = -np.take_along_axis(np.asarray(logp_i), np.asarray(image[..., None]), -1).mean()
        np.testing.assert_allclose(aux["text_loss"], text_nll, rtol=1e-5)
        np.testing.assert_allclose(loss, (1 - w) * text_nll + w * image_nll, rtol=1e-5)


@pytest.mark.slow
def test_bad_inputs_name_the_sizes(rng):
    model, params, text, image = _setup(rng)
    with pytest.raises(ValueError, match=r"text \(caption\) has length 5 > the model's 4"):
        model.apply({"params": params}, jnp.ones((2, 5), jnp.int32), image)
    with pytest.raises(ValueError, match=r"image tokens ids must be in \[0, 11\), got values in \[0, 11\]"):
        model.apply({"params": params}, text, image.at[0, 0].set(11))
    with pytest.raises(ValueError, match=r"text \(caption\) ids must be in \[0, 7\)"):
        image_prompt(model, jnp.full((1, 2), 9, jnp.int32))
    with pytest.raises(ValueError, match=r"ImageDecoderConfig\.num_heads"):
        _config(num_heads=3)


def _squares(key, n):
    """Captions 1..4 and 8x8 grey images with a bright 4x4 square in the captioned quadrant."""
    labels, inside = quadrant_squares(key, n)
    return (labels + 1)[:, None], (inside * 0.8 + 0.1)[..., None]


def _brightest_quadrant(images):
    q = np.asarray(images)[..., 0].reshape(-1, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(-1, 4)
    return q.argmax(axis=1) + 1


def _train(loss_fn, params, steps, lr, rng, extra=None):
    tx = optax.adam(lr)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, extra, i):
            (_, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, extra, jax.random.fold_in(rng, i))
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, extra

        for i in range(steps):
            params, opt_state, extra = step(params, opt_state, extra, i)
    return params, extra


@pytest.mark.slow
def test_tiny_text_to_image_model_draws_what_the_caption_says(rng, tmp_path):
    captions, images = _squares(rng, 128)
    vqvae = get_model("vqvae", VQVAEConfig(num_codes=16, code_dim=8, channels=32, num_downsamples=1, image_channels=1))
    v = jax.jit(vqvae.init)(rng, images)

    def vq_loss(params, vq, key):
        (_, aux), new = vqvae.apply({"params": params, "vq": vq}, images, True, mutable=["vq"], rngs={"vq": key})
        return aux["loss"], new["vq"]

    vq_params, vq_state = _train(vq_loss, v["params"], 200, 2e-3, rng, v["vq"])
    vq_vars = {"params": vq_params, "vq": vq_state}
    tokens = vqvae.apply(vq_vars, images, method="encode").reshape(128, 16)  # [B, 4*4]

    model = ImageTokenDecoder(
        ImageDecoderConfig(
            text_vocab_size=5, image_vocab_size=16, text_len=2, image_grid=(4, 4), emb_dim=32, num_heads=2,
            num_layers=2, mlp_dim=64, dropout_rate=0.0, attention_dropout_rate=0.0,
        )
    )  # fmt: skip
    params = jax.jit(model.init)(rng, captions, tokens)["params"]

    def lm_loss(params, extra, key):
        return model.apply({"params": params}, captions, tokens, method="loss")[0], extra

    params, _ = _train(lm_loss, params, 300, 3e-3, rng)

    test_captions = jnp.arange(1, 5).repeat(8)[:, None]  # 8 pictures of each caption
    state = image_state(model, params, 32)
    drawn = decoding.sample(ImageStep(model), state, image_prompt(model, test_captions), rng, 16, top_k=4)
    pictures = vqvae.apply(vq_vars, drawn.reshape(32, 4, 4), method="decode")
    accuracy = float(np.mean(_brightest_quadrant(pictures) == np.asarray(test_captions[:, 0])))
    assert accuracy > 0.6, f"pictures match their captions {accuracy:.2f} of the time (chance 0.25)"
    # The pictures people look at: generated images under their captions, originals above reconstructions.
    names = ["top left", "top right", "bottom left", "bottom right"]
    plot_image_grid(
        [pictures[::4]], str(tmp_path / "generated.png"), col_titles=[names[int(c) - 1] for c in test_captions[::4, 0]]
    )
    recon = vqvae.apply(vq_vars, tokens[:8].reshape(8, 4, 4), method="decode")
    plot_image_grid([images[:8], recon], str(tmp_path / "reconstructions.png"), row_titles=["original", "VQ-VAE"])
    assert (tmp_path / "generated.png").stat().st_size > 2000 and (
        tmp_path / "reconstructions.png"
    ).stat().st_size > 2000
