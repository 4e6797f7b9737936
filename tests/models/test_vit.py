"""Vision Transformer: patch embedding, positions, variants, resizing, rollout, and learning a small image set."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.models import get_model
from seqjax.models.transformer import stack_layers
from seqjax.models.vit import (
    ViT,
    ViTConfig,
    attention_rollout,
    resize_grid,
    resize_position_embedding,
    vit_config,
)
from seqjax.plotting import attention_weights, plot_rollout
from tests.models.squares import quadrant_squares


def _config(**overrides):
    base = dict(num_classes=5, image_size=8, patch_size=2, emb_dim=16, num_layers=2, mlp_dim=32, num_heads=2,
                dropout_rate=0.0, attention_dropout_rate=0.0)  # fmt: skip
    return ViTConfig(**{**base, **overrides})


def _images(rng, b=3, size=8, c=3):
    return jax.random.uniform(rng, (b, size, size, c))


def _init(model, rng, images):
    return jax.jit(model.init)(rng, images)["params"]


def _perturb(params, rng):
    """Random offsets, so that the zero-initialised head and class token do not hide differences."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


@pytest.mark.slow
def test_patch_embedding_is_reshape_and_matmul(rng):
    cfg = _config(num_classes=0, num_layers=1)
    images = _images(rng)
    params = _init(ViT(cfg), rng, images)
    _, inter = ViT(cfg).apply({"params": params}, images, capture_intermediates=lambda m, _: m.name == "patch_embed",
                              mutable=["intermediates"])  # fmt: skip
    got = inter["intermediates"]["patch_embed"]["__call__"][0]  # [B, h, w, D]
    kernel, bias = params["patch_embed"]["kernel"], params["patch_embed"]["bias"]  # [P, P, C, D], [D]
    p = 2
    patches = images.reshape(3, 4, p, 4, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 4, 4, p * p * 3)
    want = patches @ np.asarray(kernel).reshape(p * p * 3, -1) + np.asarray(bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_patch_permutation_matters_only_through_positions(rng, pool):
    images = _images(rng)
    # Swap two 2x2 patches.
    perm = images.at[:, 0:2, 0:2].set(images[:, 4:6, 2:4]).at[:, 4:6, 2:4].set(images[:, 0:2, 0:2])
    # Attention treats patches as a set: without positions both poolings are invariant to the permutation.
    for position, invariant in (("learned", False), ("sinusoidal", False), ("none", True)):
        cfg = _config(position=position, pool=pool)
        model = ViT(cfg)
        params = _init(model, rng, images)
        params = _perturb(params, rng)  # a non-zero head
        a, b = model.apply({"params": params}, images), model.apply({"params": params}, perm)
        assert np.allclose(a, b, atol=1e-5) == invariant, (position, pool)


@pytest.mark.slow
def test_resizing_positions(rng):
    cfg = _config()
    model = ViT(cfg)
    images = _images(rng)
    params = _perturb(_init(model, rng, images), rng)
    before = model.apply({"params": params}, images)
    # A model that can interpolate predicts exactly as before at its own size; so does the identity resize.
    np.testing.assert_array_equal(model.apply({"params": resize_position_embedding(params, (4, 4))}, images), before)
    # Larger images run (the table is interpolated on the fly), and converted parameters give the same result.
    big = _images(rng, size=12)
    on_the_fly = model.apply({"params": params}, big)
    converted = ViT(cfg.replace(image_size=12)).apply({"params": resize_position_embedding(params, (6, 6))}, big)
    np.testing.assert_allclose(on_the_fly, converted, rtol=1e-6)
    # Bilinear resizing keeps a linear ramp linear (interior points).
    ramp = jnp.broadcast_to(jnp.arange(4.0)[:, None, None], (4, 4, 2))
    up = resize_grid(ramp, (8, 8))[:, 0, 0]
    np.testing.assert_allclose(np.diff(up[1:-1]), 0.5, rtol=1e-6)


def test_variants_and_registry():
    cfg = vit_config("S/16", num_classes=10)
    assert (cfg.emb_dim, cfg.num_layers, cfg.mlp_dim, cfg.num_heads, cfg.patch_size) == (384, 12, 1536, 6, 16)
    assert vit_config("B/32", num_classes=1).patch_size == 32
    assert isinstance(get_model("vit", cfg), ViT)
    with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
        vit_config("X/16", num_classes=1)
    with pytest.raises(ValueError, match=r"ViTConfig.image_size \(30, 30\) must be divisible by ViTConfig.patch_size"):
        vit_config("Ti/16", num_classes=1, image_size=30)
    with pytest.raises(ValueError, match=r"ViTConfig\.num_heads"):
        _config(num_heads=3)


@pytest.mark.slow
def test_bad_images_name_the_sizes(rng):
    model = ViT(_config())
    params = _init(model, rng, _images(rng))
    with pytest.raises(ValueError, match=r"divisible by patch_size=2, got \(3, 9, 8, 3\)"):
        model.apply({"params": params}, jnp.zeros((3, 9, 8, 3)))


@pytest.mark.slow
def test_scanned_stack_and_rollout(rng, tmp_path):
    cfg = _config()
    images = _images(rng)
    params = _init(ViT(cfg), rng, images)
    scanned = ViT(cfg.replace(scan_layers=True))
    out = scanned.apply({"params": stack_layers(params)}, images)
    np.testing.assert_allclose(out, ViT(cfg).apply({"params": params}, images), rtol=1e-5, atol=1e-6)
    weights = attention_weights(ViT(cfg), {"params": params}, images)
    layers = [weights[f"stack/layers_{i}/self_attention"] for i in range(2)]
    rollout = np.asarray(attention_rollout(layers))  # [B, 17, 17]
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-5)
    # One layer, by hand: 0.5 * mean_heads(A) + 0.5 * I (rows of A sum to 1).
    one = np.asarray(attention_rollout(layers[:1]))
    np.testing.assert_allclose(one, 0.5 * layers[0].mean(1) + 0.5 * np.eye(17), rtol=1e-5, atol=1e-7)
    maps = rollout[:, 0, 1:].reshape(3, 4, 4)  # the class token's view of the patches
    path = plot_rollout(np.asarray(images), maps, str(tmp_path / "rollout.png"), titles=["a", "b", "c"])
    assert (tmp_path / "rollout.png").stat().st_size > 1000 and path.endswith(".png")


def _shapes_dataset(key, n):
    """8x8 grey images, 4 classes: a bright 4x4 square in one of the four quadrants, plus noise."""
    k1, k2 = jax.random.split(key)
    labels, inside = quadrant_squares(k1, n)
    images = inside * 0.8 + 0.3 * jax.random.uniform(k2, (n, 8, 8))
    return images[..., None], labels


@pytest.mark.slow
def test_tiny_vit_learns_a_small_image_set(rng):
    cfg = _config(num_classes=4, emb_dim=32, mlp_dim=64, pool="gap")
    model = ViT(cfg)
    train_x, train_y = _shapes_dataset(rng, 256)
    params = _init(model, rng, train_x[:2])
    tx = optax.adam(3e-3)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, i):
            idx = jax.random.choice(jax.random.fold_in(rng, i), 256, (64,), replace=False)

            def loss_fn(p):
                logits = model.apply({"params": p}, train_x[idx])
                return optax.softmax_cross_entropy_with_integer_labels(logits, train_y[idx]).mean()

            grads = jax.grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        for i in range(150):
            params, opt_state = step(params, opt_state, i)
    test_x, test_y = _shapes_dataset(jax.random.key(99), 256)
    accuracy = float(jnp.mean(jnp.argmax(model.apply({"params": params}, test_x), -1) == test_y))
    assert accuracy > 0.9, f"accuracy {accuracy:.3f} (chance 0.25)"
