"""What the experiments share about data: the data directory a config names, the first examples of a source, and
the image datasets (with their labels) that the image experiments train on.

A source here is random-access (`len`, `source[i]`), as `tfds.data_source` and the builders' splits are, and as
`seqjax.data.pipeline.Pipeline` reads them. Examples of the image sources are {"image": uint8 [H, W, C],
"label": int32}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from seqjax.data import datasets
from seqjax.data.pipeline import Mapped, read_many
from seqjax.errors import ConfigError

IMAGE_SOURCES = ("captioned_shapes", *datasets.IMAGE_DATASETS)  # what `image_sources` reads
CAPTIONED_SHAPES_TEST = 2000  # the fixed test split of captioned_shapes that every image experiment shares


def data_dir(config: Any) -> str:
    """The TFDS data directory of `config.data_dir` ("" or missing: TFDS's default, ~/tensorflow_datasets)."""
    return datasets.resolve_data_dir(config.get("data_dir"))


def head(source: Sequence, n: int | None = None) -> list:
    """The first `n` examples of a random-access source (all of them when None), in one read."""
    return read_many(source, list(range(len(source) if n is None else min(n, len(source)))))


def captioned_shapes_sources(config: Any) -> dict:
    """The captioned_shapes splits every image experiment shares: `num_train_examples` training images and a fixed
    test split of `CAPTIONED_SHAPES_TEST` (experiments evaluate on its first `num_eval_examples`), drawn from
    `data_seed`, built offline into the data directory on first use."""
    from seqjax.data.builders import build, captioned_shapes

    data = captioned_shapes.CaptionedShapesConfig(
        name=f"n{config.num_train_examples}-s{config.data_seed}",
        num_train=config.num_train_examples,
        num_test=CAPTIONED_SHAPES_TEST,
        seed=config.data_seed,
    )
    return build("captioned_shapes", data_dir(config), data).as_data_source()


def image_sources(config: Any) -> tuple[Sequence, Sequence, list[str], tuple[int, int, int]]:
    """(train, test, class names, image shape) for `config.dataset` (one of `IMAGE_SOURCES`); captioned_shapes is
    labelled by its shape (10 digits and 3 shapes)."""
    if config.dataset not in IMAGE_SOURCES:
        raise ConfigError("dataset", f"{config.dataset!r} is unknown (one of {', '.join(IMAGE_SOURCES)})")
    if config.dataset == "captioned_shapes":
        from seqjax.data.builders import captioned_shapes

        sources = captioned_shapes_sources(config)
        pick = lambda ex: {"image": ex["image"], "label": np.int32(ex["shape"])}
        train, test = Mapped(sources["train"], pick), Mapped(sources["test"], pick)
        return train, test, list(captioned_shapes.SHAPES), (32, 32, 3)
    train, names = datasets.image_classes(config.dataset, "train", data_dir=data_dir(config))
    test, _ = datasets.image_classes(config.dataset, "test", data_dir=data_dir(config))
    return train, test, names, (32, 32, 3) if config.dataset == "cifar10" else (28, 28, 1)


def images_to_float(images: Any) -> Any:
    """uint8 images [B..., H, W, C] as float32 in [0, 1] (a jax.Array; traceable)."""
    import jax.numpy as jnp

    return jnp.asarray(images, jnp.float32) / 255.0


__all__ = [
    "CAPTIONED_SHAPES_TEST",
    "IMAGE_SOURCES",
    "captioned_shapes_sources",
    "data_dir",
    "head",
    "image_sources",
    "images_to_float",
]
