"""Real datasets through the same pipeline, with their tokenizers.

- `char_lm("tiny_shakespeare", split, seq_len)`: characters, windows over the split's one long text.
- `image_classes("mnist" | "fashion_mnist" | "cifar10", split)`: images, labels and class-name captions.
- `subword_lm("lm1b", split, vocab_size)`: sentences as SentencePiece ids, the model trained on the data.
- `translation("ted_hrlr_translate/pt_to_en", split, vocab_size)`: sentence pairs as ids of one SentencePiece
  model trained on both languages.

Each returns a random-access source for `seqjax.data.pipeline.Pipeline` and the tokenizer (cached in
`DATA_DIR/seqjax/`, written atomically). Data is read with `tfds.data_source` (ArrayRecord files), never downloaded
at run time: prepare it once on a machine with network (see `DataNotPreparedError`), then copy the data directory.
Tests run these on `tfds.testing.mock_data`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from seqjax.data import hide_accelerators_from_tensorflow
from seqjax.data.pipeline import Mapped, Windows, pad, read_many
from seqjax.data.tokenizers import ByteTokenizer, CharTokenizer, SubwordTokenizer
from seqjax.errors import ConfigError

IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10")


class DataNotPreparedError(ConfigError, RuntimeError):
    """The dataset's files are not in the data directory (and seqjax never downloads at run time): a
    `ConfigError` on `config.data_dir` whose message says how to prepare them."""

    def __init__(self, message: str, key: str = "data_dir"):
        super().__init__(key, message)

    def __reduce__(self):
        return type(self), (self.message, self.key)


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir`, or TFDS's default (~/tensorflow_datasets) when it is None or "" (the one place that says so)."""
    import tensorflow_datasets as tfds

    return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def how_to_prepare(name: str, data_dir: str | None) -> str:
    d = resolve_data_dir(data_dir)
    return (  # one line: the entry points print it as `error: config.data_dir: ...`
        f"{name} is not prepared in {d}, and seqjax does not download at run time (on a machine with network: "
        f"`pip install tensorflow-datasets tensorflow; tfds build {name} --data_dir DIR --file_format array_record`, "
        f"then copy DIR to this machine: to {d}, or anywhere and pass data_dir / --config.data_dir; for data that "
        f"must be downloaded by hand, put the files in DIR/downloads/manual first, TFDS's manual_dir)"
    )


def open_split(name: str, split: str, data_dir: str | None = None) -> Sequence:
    """`tfds.data_source(name, split=...)` from `data_dir`, or a `DataNotPreparedError` saying what to do."""
    import tensorflow_datasets as tfds

    hide_accelerators_from_tensorflow()
    try:
        return tfds.data_source(name, split=split, data_dir=resolve_data_dir(data_dir), download=False)
    except Exception as e:  # TFDS says NotImplementedError (no ArrayRecord files), AssertionError, FileNotFoundError
        raise DataNotPreparedError(how_to_prepare(name, data_dir)) from e


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _cache(data_dir: str | None, filename: str) -> str:
    return os.path.join(resolve_data_dir(data_dir), "seqjax", filename)


def char_lm(
    name: str = "tiny_shakespeare",
    split: str = "train",
    seq_len: int = 128,
    *,
    data_dir: str | None = None,
    stride: int | None = None,
) -> tuple[Windows, CharTokenizer]:
    """Windows of `seq_len + 1` character ids over the split's text (all its examples joined by newlines); the
    character set is fitted on the train split and cached."""
    texts = [_text(ex["text"]) for ex in _all(open_split(name, split, data_dir))]
    tok = CharTokenizer.load_or_fit(
        _cache(data_dir, f"{name}.chars.json"),
        texts if split == "train" else [_text(ex["text"]) for ex in _all(open_split(name, "train", data_dir))],
    )
    return Windows(tok.encode("\n".join(texts)), seq_len, stride), tok


def image_classes(
    name: str, split: str = "train", *, data_dir: str | None = None, caption_length: int = 32
) -> tuple[Mapped, list[str]]:
    """Examples {image uint8 [H, W, C], label int32, caption [caption_length] byte ids ("a photo of a cat"; for
    mnist "a handwritten 7")} and the class names."""
    import tensorflow_datasets as tfds

    if name not in IMAGE_DATASETS:
        raise ConfigError("dataset", f"{name!r} is not an image dataset here (one of {', '.join(IMAGE_DATASETS)})")
    source = open_split(name, split, data_dir)
    names = list(tfds.builder(name, data_dir=resolve_data_dir(data_dir)).info.features["label"].names)
    byte = ByteTokenizer()
    captions = list(pad([byte.encode(caption_for(name, n), eos=True) for n in names], caption_length))

    def example(ex):
        label = int(ex["label"])
        return {"image": np.asarray(ex["image"], np.uint8), "label": np.int32(label), "caption": captions[label]}

    return Mapped(source, example), names


def caption_for(name: str, class_name: str) -> str:
    if name == "mnist":
        return f"a handwritten {class_name}"
    article = "an" if class_name[:1] in "aeiou" else "a"
    return f"a photo of {article} {class_name.replace('_', ' ')}"


def subword_lm(
    name: str = "lm1b",
    split: str = "train",
    vocab_size: int = 8000,
    seq_len: int = 64,
    *,
    data_dir: str | None = None,
    max_train_sentences: int = 200_000,
) -> tuple[Mapped, SubwordTokenizer]:
    """Sentences as [seq_len] ids (bos ... eos, padded) under a SentencePiece model trained on up to
    `max_train_sentences` of the train split and cached in the data directory."""
    train = open_split(name, "train", data_dir)
    tok = SubwordTokenizer.load_or_train(
        _cache(data_dir, f"{name}.sp{vocab_size}.model"),
        (_text(train[i]["text"]) for i in range(min(len(train), max_train_sentences))),
        vocab_size,
    )
    source = train if split == "train" else open_split(name, split, data_dir)
    return Mapped(
        source, lambda ex: {"tokens": pad([tok.encode(_text(ex["text"]), bos=True, eos=True)], seq_len)[0]}
    ), tok


def translation(
    name: str = "ted_hrlr_translate/pt_to_en",
    split: str = "train",
    vocab_size: int = 8000,
    *,
    data_dir: str | None = None,
    max_train_sentences: int = 200_000,
) -> tuple[Mapped, SubwordTokenizer, tuple[str, str]]:
    """Pairs {"inputs": source ids, "targets": target ids} (no bos / eos: the collate function adds them), the shared
    SentencePiece model (trained on both sides of the train split, cached), and the (source, target) keys."""
    import tensorflow_datasets as tfds

    keys = tuple(tfds.builder(name, data_dir=resolve_data_dir(data_dir)).info.supervised_keys)
    train = open_split(name, "train", data_dir)

    def texts():
        for i in range(min(len(train), max_train_sentences // 2)):
            ex = train[i]
            yield _text(ex[keys[0]])
            yield _text(ex[keys[1]])

    tok = SubwordTokenizer.load_or_train(
        _cache(data_dir, f"{name.replace('/', '_')}.sp{vocab_size}.model"), texts(), vocab_size
    )
    source = train if split == "train" else open_split(name, split, data_dir)

    def pair(ex):
        return {"inputs": tok.encode(_text(ex[keys[0]])), "targets": tok.encode(_text(ex[keys[1]]))}

    return Mapped(source, pair), tok, keys


def _all(source: Sequence) -> list:
    return read_many(source, list(range(len(source))))


__all__ = [
    "IMAGE_DATASETS",
    "DataNotPreparedError",
    "caption_for",
    "char_lm",
    "how_to_prepare",
    "image_classes",
    "open_split",
    "resolve_data_dir",
    "subword_lm",
    "translation",
]
