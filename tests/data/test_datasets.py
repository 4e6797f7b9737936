"""Real-dataset pipelines on tfds.testing.mock_data (no download), and the error when data is not prepared."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from seqjax.data import datasets
from seqjax.data.pipeline import Pipeline, stack
from seqjax.data.tokenizers import EOS, ByteTokenizer


def _pipe(source, batch_size=4):
    return Pipeline(source, batch_size, seed=0, collate=stack, process_index=0, process_count=1)


def test_tiny_shakespeare_characters(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        windows, tok = datasets.char_lm("tiny_shakespeare", "train", seq_len=8, data_dir=str(tmp_path))
        batch = _pipe(windows).batch(0)
    assert batch["inputs"].shape == batch["targets"].shape == (4, 8)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])  # next-character targets
    assert batch["inputs"].max() < tok.vocab_size
    assert (tmp_path / "seqjax" / "tiny_shakespeare.chars.json").exists()  # cached beside the data


@pytest.mark.parametrize("name", datasets.IMAGE_DATASETS)
def test_image_datasets_with_class_name_captions(tmp_path, name):
    with tfds.testing.mock_data(num_examples=8):
        source, names = datasets.image_classes(name, "train", data_dir=str(tmp_path))
        batch = _pipe(source).batch(1)
    side, channels = (32, 3) if name == "cifar10" else (28, 1)
    assert batch["image"].shape == (4, side, side, channels) and batch["image"].dtype == np.uint8
    assert len(names) == 10 and set(batch["label"].tolist()) <= set(range(10))
    byte = ByteTokenizer()
    for label, caption in zip(batch["label"], batch["caption"], strict=True):
        assert byte.decode(caption) == datasets.caption_for(name, names[label])
        assert EOS in caption.tolist()
    if name == "cifar10":
        assert datasets.caption_for(name, "airplane") == "a photo of an airplane"


def test_lm1b_subwords_trained_and_cached(tmp_path):
    with tfds.testing.mock_data(num_examples=50):
        source, tok = datasets.subword_lm("lm1b", "train", vocab_size=30, seq_len=16, data_dir=str(tmp_path))
        batch = _pipe(source).batch(0)
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].max() < tok.vocab_size
    assert (batch["tokens"][:, 0] == 1).all()  # bos
    assert (tmp_path / "seqjax" / "lm1b.sp30.model").exists()


def test_missing_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(datasets.DataNotPreparedError, match=r"tfds build mnist --data_dir DIR") as info:
        datasets.open_split("mnist", "train", data_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "copy DIR" in str(info.value)
    with pytest.raises(ValueError, match="not an image dataset"):
        datasets.image_classes("imagenet2012", data_dir=str(tmp_path))
