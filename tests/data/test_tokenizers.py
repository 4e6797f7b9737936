"""Tokenizers: reserved ids, round trips, unknown characters, caching, and SentencePiece trained on the data."""

import numpy as np
import pytest

from seqjax.data.tokenizers import (
    BOS,
    EOS,
    NUM_RESERVED,
    PAD,
    UNK,
    ByteTokenizer,
    CharTokenizer,
    SubwordTokenizer,
    WordTokenizer,
)

TEXT = "To be, or not to be: that is the question. Ünïcödé ✓"


def test_byte_tokenizer_round_trip_and_ids():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids.dtype == np.int32 and ids[0] == BOS and ids[-1] == EOS
    np.testing.assert_array_equal(ids[1:-1], np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32) + NUM_RESERVED)
    assert tok.decode(ids) == TEXT and tok.vocab_size == 260
    assert tok.decode([*tok.encode("ab"), PAD, PAD]) == "ab"
    assert tok.decode([*tok.encode("ab"), EOS, *tok.encode("cd")]) == "ab"  # stops at the first EOS


def test_char_tokenizer_fit_save_load_and_unknown(tmp_path):
    tok = CharTokenizer.fit(["hello", b"world"])
    assert tok.chars == sorted(set("helloworld")) and tok.vocab_size == len(set("helloworld")) + NUM_RESERVED
    ids = tok.encode("hold")
    assert ids.min() >= NUM_RESERVED and tok.decode(ids) == "hold"
    assert tok.encode("hz").tolist() == [tok.encode("h")[0], UNK]
    path = str(tmp_path / "tok" / "chars.json")
    cached = CharTokenizer.load_or_fit(path, ["hello world"])
    again = CharTokenizer.load_or_fit(path, ["something else entirely"])  # read from the cache, not refitted
    assert again.chars == cached.chars
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer(["a", "a"])


def test_subword_tokenizer_trained_on_the_data(tmp_path):
    pytest.importorskip("sentencepiece")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "quickly"]
    corpus = [" ".join(rng.choice(words, size=8)) for _ in range(300)]
    path = str(tmp_path / "sp.model")
    tok = SubwordTokenizer.load_or_train(path, corpus, vocab_size=40)
    ids = tok.encode(corpus[0], bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and ids[1:-1].min() >= NUM_RESERVED
    assert tok.decode(ids) == corpus[0]
    # Subwords: frequent words become single pieces, so a sentence takes fewer ids than characters.
    assert len(ids) - 2 < len(corpus[0]) / 2
    again = SubwordTokenizer.load_or_train(path, ["x"], vocab_size=40)  # the cached model
    assert again.encode(corpus[1]).tolist() == tok.encode(corpus[1]).tolist()


def test_word_tokenizer():
    tok = WordTokenizer.fit(["the cat sees a dog .", b"a dog runs ."])
    assert tok.words == sorted({"the", "cat", "sees", "a", "dog", ".", "runs"})
    ids = tok.encode("a cat runs .", bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == 6 and ids[1:-1].min() >= NUM_RESERVED
    assert tok.decode(ids) == "a cat runs ."
    assert tok.encode("a unicorn").tolist() == [tok.encode("a")[0], UNK] and tok.decode([UNK]) == "<unk>"
    with pytest.raises(ValueError, match="distinct"):
        WordTokenizer(["a", "a b"])
