"""Attention-weight extraction and the heat-map picture."""

import jax
import numpy as np
import pytest

from seqjax.models import Transformer, TransformerConfig
from seqjax.plotting import attention_weights, plot_attention


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_attention_weights_of_every_layer(rng, scan):
    cfg = TransformerConfig(
        vocab_size=11, emb_dim=16, num_heads=2, num_layers=2, mlp_dim=32, max_len=12, scan_layers=scan
    )
    inputs = jax.random.randint(rng, (2, 7), 1, 11).at[:, -2:].set(0)  # two padded source positions
    targets = jax.random.randint(rng, (2, 5), 1, 11)
    model = Transformer(cfg)
    variables = jax.jit(model.init)(rng, inputs, targets)
    weights = attention_weights(model, variables, inputs, targets)
    assert sorted(weights) == sorted(
        [f"encoder/stack/layers_{i}/self_attention" for i in range(2)]
        + [f"decoder/stack/layers_{i}/{kind}" for i in range(2) for kind in ("self_attention", "cross_attention")]
    )
    self_w = weights["decoder/stack/layers_1/self_attention"]
    cross_w = weights["decoder/stack/layers_0/cross_attention"]
    assert self_w.shape == (2, 2, 5, 5) and cross_w.shape == (2, 2, 5, 7)
    np.testing.assert_allclose(self_w.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(self_w, k=1) == 0.0)  # the decoder never looks ahead
    assert np.all(cross_w[..., -2:] == 0.0)  # nor at source padding


def test_plot_attention_writes_a_png(tmp_path):
    import matplotlib.image

    weights = np.random.default_rng(0).dirichlet(np.ones(6), size=(3, 4))  # [N=3, Tq=4, Tk=6]
    path = plot_attention(
        weights, str(tmp_path / "attn.png"), query_labels=list("abcd"), key_labels=list("uvwxyz"), title="t"
    )
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # three panels side by side
    with pytest.raises(ValueError, match=r"\[N, Tq, Tk\]"):
        plot_attention(weights[0], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="key_labels has 2 entries for 6 positions"):
        plot_attention(weights, str(tmp_path / "x.png"), key_labels=["a", "b"])


def test_plot_image_grid_writes_a_png(tmp_path):
    import matplotlib.image

    from seqjax.plotting import plot_image_grid

    originals = np.random.default_rng(0).uniform(size=(4, 8, 8, 1))
    path = plot_image_grid(
        [originals, originals * 0.5], str(tmp_path / "grid.png"), row_titles=["original", "reconstruction"],
        col_titles=["a", "b", "c", "d"],
    )  # fmt: skip
    image = matplotlib.image.imread(path)
    assert image.shape[1] > image.shape[0]  # four columns, two rows
    with pytest.raises(ValueError, match="one B"):
        plot_image_grid([originals, originals[:2]], str(tmp_path / "x.png"))
