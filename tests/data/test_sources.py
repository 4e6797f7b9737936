"""`seqjax.data.sources`: what the experiments share about data (the data directory, the first n examples, the
image datasets)."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from seqjax.data import sources
from seqjax.errors import ConfigError


def _config(**fields) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {"dataset": "captioned_shapes", "num_train_examples": 16, "data_seed": 0, "data_dir": ""}
    )
    c.update(fields)
    return c


def test_data_dir_is_the_config_s_or_tfds_default():
    import tensorflow_datasets as tfds

    assert sources.data_dir(_config(data_dir="~/d")) == os.path.expanduser("~/d")
    assert sources.data_dir(_config()) == os.path.expanduser(tfds.core.constants.DATA_DIR)
    assert sources.data_dir(ml_collections.ConfigDict()) == sources.data_dir(_config())  # no data_dir field


def test_head_reads_the_first_examples():
    source = list(range(5))
    assert sources.head(source, 3) == [0, 1, 2]
    assert sources.head(source) == sources.head(source, 99) == source


def test_image_sources(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.dataset: 'svhn' is unknown \(one of captioned_shapes, mnist"):
        sources.image_sources(_config(dataset="svhn"))
    train, test, names, shape = sources.image_sources(_config(data_dir=str(tmp_path)))
    assert (len(train), len(test), shape) == (16, sources.CAPTIONED_SHAPES_TEST, (32, 32, 3))
    ex = train[0]
    assert ex["image"].shape == shape and ex["image"].dtype == np.uint8 and 0 <= ex["label"] < len(names)
    floats = np.asarray(sources.images_to_float(ex["image"]))
    assert floats.dtype == np.float32 and 0.0 <= floats.min() <= floats.max() <= 1.0
