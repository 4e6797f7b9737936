"""VQ-VAE: nearest codes, straight-through gradients, EMA codebook updates and restarts by hand, reconstruction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.models import get_model
from seqjax.models.vqvae import VQVAE, VectorQuantizer, VQVAEConfig, nearest_code
from tests.models.squares import quadrant_squares


def _vq_variables(codebook, count=None):
    codebook = jnp.asarray(codebook, jnp.float32)
    count = jnp.ones(codebook.shape[0]) if count is None else jnp.asarray(count, jnp.float32)
    return {"vq": {"codebook": codebook, "ema_count": count, "ema_sum": codebook * count[:, None]}}


def test_nearest_code_against_numpy(rng):
    flat = jax.random.normal(rng, (50, 3))
    codebook = jax.random.normal(jax.random.fold_in(rng, 1), (7, 3))
    want = np.argmin(((np.asarray(flat)[:, None] - np.asarray(codebook)[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_code(flat, codebook), want)


@pytest.mark.slow
def test_quantizer_forward_and_straight_through_by_hand():
    vq = VectorQuantizer(num_codes=2, commitment=0.25, restart_threshold=0.0)
    variables = _vq_variables([[0.0], [1.0]])
    z = jnp.array([[0.1], [0.9], [1.2]])
    z_q, codes, aux = vq.apply(variables, z)
    np.testing.assert_array_equal(codes, [0, 1, 1])
    np.testing.assert_allclose(z_q, [[0.0], [1.0], [1.0]], atol=1e-7)
    np.testing.assert_allclose(aux["commitment_loss"], 0.25 * (0.01 + 0.01 + 0.04) / 3, rtol=1e-5)
    p = np.array([1 / 3, 2 / 3])
    np.testing.assert_allclose(aux["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    # Straight through: d/dz sum(w * z_q) = w; the commitment loss pulls z toward its code: 2β(z - q)/M.
    w = jnp.array([[2.0], [-1.0], [0.5]])
    grad = jax.grad(lambda z: jnp.sum(w * vq.apply(variables, z)[0]))(z)
    np.testing.assert_allclose(grad, w)
    grad = jax.grad(lambda z: vq.apply(variables, z)[2]["commitment_loss"])(z)
    np.testing.assert_allclose(grad, 2 * 0.25 * (z - jnp.array([[0.0], [1.0], [1.0]])) / 3, rtol=1e-5)


def test_ema_codebook_update_by_hand():
    vq = VectorQuantizer(num_codes=2, decay=0.5, restart_threshold=0.0, eps=0.0)
    z = jnp.array([[0.1], [0.9], [1.2]])  # codes 0, 1, 1
    _, new = vq.apply(_vq_variables([[0.0], [1.0]]), z, True, mutable=["vq"])
    # count = 0.5 * 1 + 0.5 * [1, 2] = [1, 1.5]; sum = 0.5 * [0, 1] + 0.5 * [0.1, 2.1] = [0.05, 1.55]
    np.testing.assert_allclose(new["vq"]["ema_count"], [1.0, 1.5], rtol=1e-6)
    np.testing.assert_allclose(new["vq"]["ema_sum"], [[0.05], [1.55]], rtol=1e-6)
    np.testing.assert_allclose(new["vq"]["codebook"], [[0.05], [1.55 / 1.5]], rtol=1e-6)
    # Not training, or the collection not mutable: nothing moves.
    _, same = vq.apply(_vq_variables([[0.0], [1.0]]), z, False, mutable=["vq"])
    np.testing.assert_array_equal(same["vq"]["codebook"], [[0.0], [1.0]])


def test_dead_codes_restart_at_batch_vectors(rng):
    vq = VectorQuantizer(num_codes=3, decay=0.5, restart_threshold=0.3)
    variables = _vq_variables([[0.0], [1.0], [50.0]], count=[1.0, 1.0, 0.2])  # code 2 is far away and rarely used
    z = jnp.array([[0.1], [0.9], [1.2], [0.2]])
    _, new = vq.apply(variables, z, True, mutable=["vq"], rngs={"vq": rng})
    count = new["vq"]["ema_count"]
    assert count[2] == 1.0  # 0.5 * 0.2 = 0.1 < 0.3: restarted with count 1
    assert np.isclose(np.asarray(z)[:, 0], float(new["vq"]["codebook"][2, 0])).any()  # at one of the batch's vectors
    np.testing.assert_allclose(count[:2], [1.5, 1.5], rtol=1e-6)  # live codes follow the EMA: 0.5 + 0.5 * 2


def _squares(key, n):
    """8x8 grey images: a bright 4x4 square in one of the four quadrants."""
    return (quadrant_squares(key, n)[1] * 0.8 + 0.1)[..., None]


@pytest.mark.slow
@pytest.mark.parametrize("res_blocks", [0, 1])
def test_trained_tiny_vqvae_reconstructs_its_images(rng, res_blocks):
    cfg = VQVAEConfig(num_codes=32, code_dim=8, channels=32, num_downsamples=1, image_channels=1, res_blocks=res_blocks)
    model = get_model("vqvae", cfg)
    images = _squares(rng, 64)
    variables = jax.jit(model.init)(rng, images)
    params, vq = variables["params"], variables["vq"]
    tx = optax.adam(2e-3)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        opt_state = tx.init(params)

        @jax.jit
        def step(params, vq, opt_state, i):
            def loss_fn(p):
                (_, aux), new = model.apply(
                    {"params": p, "vq": vq}, images, True, mutable=["vq"], rngs={"vq": jax.random.fold_in(rng, i)}
                )
                return aux["loss"], new["vq"]

            (_, vq), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), vq, opt_state

        for i in range(200):
            params, vq, opt_state = step(params, vq, opt_state, i)
    codes = model.apply({"params": params, "vq": vq}, images, method="encode")
    assert codes.shape == (64, 4, 4) and codes.dtype == jnp.int32
    recon = model.apply({"params": params, "vq": vq}, codes, method="decode")
    mse = float(jnp.mean((recon - images) ** 2))
    assert mse < 0.05 * float(jnp.var(images)), f"reconstruction mse {mse:.4g} vs data variance {jnp.var(images):.4g}"
    _, aux = model.apply({"params": params, "vq": vq}, images)
    assert 1.0 < float(aux["perplexity"]) <= 32 and 0 < float(aux["usage"]) <= 1


@pytest.mark.slow
def test_residual_blocks_with_zero_output_convolutions_are_the_identity(rng):
    """res_blocks adds x + conv1x1(relu(conv3x3(relu(x)))) in the encoder and the decoder: with the 1x1 convolutions
    zeroed, the model computes exactly what the model without blocks computes with the same other weights."""
    images = jax.random.uniform(rng, (2, 8, 8, 3))
    plain = VQVAE(VQVAEConfig(num_codes=16, code_dim=4, channels=8, num_downsamples=1))
    deep = VQVAE(VQVAEConfig(num_codes=16, code_dim=4, channels=8, num_downsamples=1, res_blocks=2))
    variables = deep.init(rng, images)
    params = variables["params"]
    for part in ("encoder", "decoder"):
        names = [k for k in params[part] if "_res_" in k]
        assert sorted(names) == sorted(f"{part[:3]}_res_{i}_{ab}" for i in range(2) for ab in "ab")
        params[part] = {k: jax.tree.map(jnp.zeros_like, v) if k.endswith("_b") else v for k, v in params[part].items()}
    out_deep, _ = deep.apply({**variables, "params": params}, images)
    stripped = {part: {k: v for k, v in params[part].items() if "_res_" not in k} for part in ("encoder", "decoder")}
    out_plain, _ = plain.apply({**variables, "params": stripped}, images)
    np.testing.assert_allclose(np.asarray(out_deep), np.asarray(out_plain), rtol=1e-6, atol=1e-6)
    params["decoder"]["dec_res_0_b"]["kernel"] = jnp.ones_like(params["decoder"]["dec_res_0_b"]["kernel"])
    out_changed, _ = deep.apply({**variables, "params": params}, images)
    assert not np.allclose(np.asarray(out_changed), np.asarray(out_plain))  # the blocks are in the path


def test_bad_inputs_name_the_sizes(rng):
    model = VQVAE(VQVAEConfig(num_downsamples=2, image_channels=3))
    with pytest.raises(ValueError, match=r"divisible by 4, got \(1, 6, 8, 3\)"):
        model.init(rng, jnp.zeros((1, 6, 8, 3)))
    with pytest.raises(ValueError, match=r"VQVAEConfig\.num_codes"):
        VQVAEConfig(num_codes=0)
    with pytest.raises(ValueError, match=r"VQVAEConfig\.res_blocks"):
        VQVAEConfig(res_blocks=-1)
