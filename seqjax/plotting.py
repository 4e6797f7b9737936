"""Attention weights out of a model, and pictures of them.

`attention_weights` runs any model built from `seqjax.nn.MultiHeadAttention` with the "intermediates" collection
mutable and returns every layer's weights by module path; `plot_attention` draws one layer as a heat map per head.
matplotlib is imported only when drawing, with the file-only "Agg" backend.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from seqjax.models.transformer import unstack_layers

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("model", "mutable", "kwargs"))
def _sown(model: nn.Module, variables: Any, args: tuple, *, mutable: tuple, kwargs: tuple) -> Any:
    _, state = model.apply(variables, *args, mutable=list(mutable), **dict(kwargs))
    return state


def attention_weights(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, np.ndarray]:
    """Runs `model.apply(variables, *args, **kwargs)` and collects the attention weights its attention layers sow.

    Returns:
      `{path: [B, N, Tq, Tk]}`, paths such as "decoder/stack/layers_1/cross_attention" (scanned stacks are unstacked
      into `layers_i`).
    """
    mutable = ("intermediates", "cache") if "cache" in variables else ("intermediates",)  # decode=True models
    try:
        static = tuple(sorted(kwargs.items()))
        hash((model, static))
    except TypeError:  # unhashable keywords: run it eagerly
        _, state = model.apply(variables, *args, mutable=list(mutable), **kwargs)
    else:  # compiled once per model, keywords and shapes
        state = _sown(model, variables, args, mutable=mutable, kwargs=static)
    tree = unstack_layers(state.get("intermediates", {}))
    flat = traverse_util.flatten_dict(tree, sep="/")
    out = {}
    for path, value in flat.items():
        head, _, leaf = path.rpartition("/")
        if leaf == "attention_weights":
            out[head] = np.asarray(value[-1] if isinstance(value, tuple) else value)  # sow keeps a tuple of calls
    if not out:
        raise ValueError("attention_weights: the model sowed no attention weights (no MultiHeadAttention ran)")
    return out


def plot_attention(
    weights: np.ndarray,
    path: str,
    *,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Draws `weights [N, Tq, Tk]` (one example's layer) as N heat maps side by side: rows = queries, columns =
    keys, colour 0..1. Writes a PNG to `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = np.asarray(weights)
    if weights.ndim != 3:
        raise ValueError(f"plot_attention expects one example's weights [N, Tq, Tk], got shape {weights.shape}")
    n, tq, tk = weights.shape
    for name, labels, size in (("query_labels", query_labels, tq), ("key_labels", key_labels, tk)):
        if labels is not None and len(labels) != size:
            raise ValueError(f"plot_attention: {name} has {len(labels)} entries for {size} positions")
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 1.0, 2.8), squeeze=False)
    image = None
    for h, ax in enumerate(axes[0]):
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"head {h}", fontsize=9)
        if key_labels is not None:
            ax.set_xticks(range(tk), key_labels, fontsize=6, rotation=90)
        ax.set_xlabel("key", fontsize=8)
        if query_labels is not None:
            ax.set_yticks(range(tq), query_labels if h == 0 else [""] * tq, fontsize=6)
    axes[0][0].set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.02)
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)  # above the heads' titles
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_rollout(images: np.ndarray, maps: np.ndarray, path: str, *, titles: Sequence[str] | None = None) -> str:
    """Images `[B, H, W, C]` (values in [0, 1]) above their attention maps `[B, h, w]` (e.g. the class token's row
    of `seqjax.models.vit.attention_rollout`, reshaped to the patch grid) drawn over them. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, maps = np.asarray(images), np.asarray(maps)
    if images.ndim != 4 or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"plot_rollout expects images [B, H, W, C] and maps [B, h, w]; got {images.shape}, {maps.shape}"
        )
    b, h, w = images.shape[0], images.shape[1], images.shape[2]
    fig, axes = plt.subplots(2, b, figsize=(2.0 * b, 4.2), squeeze=False)
    for i in range(b):
        img = images[i] if images.shape[-1] == 3 else images[i, ..., 0]
        axes[0][i].imshow(np.clip(img, 0, 1), cmap=None if images.shape[-1] == 3 else "gray")
        axes[1][i].imshow(np.clip(img, 0, 1), cmap=None if images.shape[-1] == 3 else "gray")
        axes[1][i].imshow(maps[i], cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            axes[0][i].set_title(titles[i], fontsize=8)
    axes[1][0].set_ylabel("attention rollout", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_image_grid(
    rows: Sequence[np.ndarray],
    path: str,
    *,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    title: str | None = None,
    captions: Sequence[str] | None = None,
    labels: Sequence[Sequence[str]] | None = None,
) -> str:
    """Rows of images, each `[B, H, W, C]` with values in [0, 1] (C = 1 or 3): e.g. generated images with their
    captions under each column (`captions`, written below the last row), or originals above their VQ-VAE
    reconstructions (two rows, `row_titles`). `labels[i][j]`: a short note under image j of row i (above the
    caption on the last row). PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [np.asarray(r) for r in rows]
    if not rows or any(r.ndim != 4 or r.shape[0] != rows[0].shape[0] for r in rows):
        raise ValueError(
            f"plot_image_grid expects rows of images [B, H, W, C] with one B, got {[r.shape for r in rows]}"
        )
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n + 0.6, 1.5 * len(rows) + 0.4), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            img = np.clip(row[j], 0.0, 1.0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and col_titles is not None:
                ax.set_title(str(col_titles[j]), fontsize=7)
            under = [str(labels[i][j])] if labels is not None else []
            if i == len(rows) - 1 and captions is not None:
                under.append(str(captions[j]))
            if under:
                ax.set_xlabel("\n".join(under), fontsize=7)
        if row_titles is not None:
            axes[i][0].set_ylabel(str(row_titles[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
