"""Tokenizers with reserved ids: PAD = 0, BOS = 1, EOS = 2, UNK = 3, then the vocabulary.

- `ByteTokenizer`: UTF-8 bytes, ids 4..259; no training, nothing unknown.
- `CharTokenizer`: the characters of a corpus (`CharTokenizer.fit(texts)`), saved as JSON beside the data.
- `WordTokenizer`: whitespace-separated words of a closed vocabulary (`WordTokenizer.fit(texts)`), for
  synthetic languages such as the `synthetic_text` grammar.
- `SubwordTokenizer`: SentencePiece (unigram or BPE) trained on the data and cached in the data directory
  (`SubwordTokenizer.load_or_train(path, texts, vocab_size)`).

All three: `encode(text, bos=False, eos=False) -> np.int32 array`, `decode(ids) -> str` (reserved ids dropped,
stopping at the first EOS), `vocab_size`. Pure Python and numpy (SentencePiece for the subword one): importing
this module imports neither TFDS nor TensorFlow.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
NUM_RESERVED = 4


class _Base:
    vocab_size: int

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def _text(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        ids = ([BOS] if bos else []) + self._ids(text) + ([EOS] if eos else [])
        return np.asarray(ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        kept = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1).tolist():
            if i == EOS:
                break
            if i >= NUM_RESERVED or i == UNK:
                kept.append(int(i))
        return self._text(kept)


class ByteTokenizer(_Base):
    """UTF-8 bytes shifted past the reserved ids."""

    vocab_size = 256 + NUM_RESERVED

    def _ids(self, text: str) -> list[int]:
        return [b + NUM_RESERVED for b in text.encode("utf-8")]

    def _text(self, ids: Sequence[int]) -> str:
        return bytes(i - NUM_RESERVED for i in ids if i >= NUM_RESERVED).decode("utf-8", errors="replace")


class CharTokenizer(_Base):
    """One id per character seen when fitted (sorted, so the same corpus gives the same ids); others map to UNK."""

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        self.chars = list(chars)
        self._index = {c: i + NUM_RESERVED for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + NUM_RESERVED

    @classmethod
    def fit(cls, texts: Iterable[str | bytes]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t.decode("utf-8") if isinstance(t, bytes) else t)
        return cls(sorted(seen))

    def _ids(self, text: str) -> list[int]:
        return [self._index.get(c, UNK) for c in text]

    def _text(self, ids: Sequence[int]) -> str:
        return "".join("\ufffd" if i == UNK else self.chars[i - NUM_RESERVED] for i in ids)

    def save(self, path: str) -> None:
        _atomic_write(path, json.dumps({"kind": "char", "chars": self.chars}).encode())

    @classmethod
    def load(cls, path: str) -> CharTokenizer:
        with open(path) as f:
            return cls(json.load(f)["chars"])

    @classmethod
    def load_or_fit(cls, path: str, texts: Iterable[str | bytes]) -> CharTokenizer:
        """The tokenizer cached at `path`, or fitted on `texts` and cached there."""
        if os.path.exists(path):
            return cls.load(path)
        tok = cls.fit(texts)
        tok.save(path)
        return tok


class WordTokenizer(_Base):
    """One id per whitespace-separated word seen when fitted (sorted); others map to UNK. Decoding joins with
    single spaces."""

    def __init__(self, words: Sequence[str]):
        if len(set(words)) != len(words) or any(not w or any(c.isspace() for c in w) for w in words):
            raise ValueError("WordTokenizer needs distinct non-empty words without whitespace")
        self.words = list(words)
        self._index = {w: i + NUM_RESERVED for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words) + NUM_RESERVED

    @classmethod
    def fit(cls, texts: Iterable[str | bytes]) -> WordTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update((t.decode("utf-8") if isinstance(t, bytes) else t).split())
        return cls(sorted(seen))

    def _ids(self, text: str) -> list[int]:
        return [self._index.get(w, UNK) for w in text.split()]

    def _text(self, ids: Sequence[int]) -> str:
        return " ".join("<unk>" if i == UNK else self.words[i - NUM_RESERVED] for i in ids)


class SubwordTokenizer(_Base):
    """SentencePiece with our reserved ids (pad 0, bos 1, eos 2, unk 3 are SentencePiece's own ids here)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD, BOS, EOS, UNK):
            raise ValueError("the SentencePiece model does not use seqjax's reserved ids (pad 0, bos 1, eos 2, unk 3)")

    @classmethod
    def train(cls, texts: Iterable[str | bytes], vocab_size: int, *, model_type: str = "unigram",
              character_coverage: float = 1.0, max_sentences: int = 200_000) -> SubwordTokenizer:  # fmt: skip
        import io

        import sentencepiece as spm

        def sentences():
            for i, t in enumerate(texts):
                if i >= max_sentences:
                    return
                yield t.decode("utf-8") if isinstance(t, bytes) else t

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
            hard_vocab_limit=False, minloglevel=2,
        )  # fmt: skip
        return cls(model.getvalue())

    def _ids(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def _text(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def save(self, path: str) -> None:
        _atomic_write(path, self.model_proto)

    @classmethod
    def load(cls, path: str) -> SubwordTokenizer:
        with open(path, "rb") as f:
            return cls(f.read())

    @classmethod
    def load_or_train(cls, path: str, texts: Iterable[str | bytes], vocab_size: int, **kwargs) -> SubwordTokenizer:
        """The model cached at `path`, or trained on `texts` and cached there (written atomically, so concurrent
        processes never read half a file)."""
        if os.path.exists(path):
            return cls.load(path)
        tok = cls.train(texts, vocab_size, **kwargs)
        tok.save(path)
        return tok


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


__all__ = [
    "BOS",
    "EOS",
    "NUM_RESERVED",
    "PAD",
    "UNK",
    "ByteTokenizer",
    "CharTokenizer",
    "SubwordTokenizer",
    "WordTokenizer",
]
