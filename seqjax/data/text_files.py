"""A researcher's own UTF-8 text files as language-model windows: `read(text_files, seq_len, ...)`.

- Files: one or more glob patterns, comma-separated (`"corpus/*.txt,extra/a.txt"`), each match once, in sorted
  order per pattern.
- Split: the last `eval_fraction` of each file's characters is held out (the train part is its first
  `int(n * (1 - eval_fraction))` characters), or, when `eval_files` names files, the text files are all training
  text and the eval files all held-out text.
- Tokens: `"char"` (a `CharTokenizer` fitted on the train parts; characters only the held-out text has become
  UNK) or `"byte"` (`ByteTokenizer`, UTF-8 bytes). The fitted characters are cached in
  `cache_dir/text-<hash of the train parts>.chars.json` (experiments pass `DATA_DIR/seqjax`), written only after
  every file was read and checked, so a failed read caches nothing and a changed corpus gets its own vocabulary.
- Windows: each part is cut into non-overlapping windows of `seq_len + 1` tokens (`inputs` = the first `seq_len`,
  `targets` = the last `seq_len`, as `char_lm` does; a window never spans two files; a part's tail shorter than a
  window is dropped), concatenated over the files into one random-access source for `Pipeline`.

Bad data raises `ConfigError(key, message)` naming the file (or pattern) and what is wrong: a pattern with no
match, an empty file, bytes that are not UTF-8 (with the byte offset), `eval_fraction` outside (0, 1), or a part
too short for one window. `key` is the setting to change: `text_files`, `eval_files` or `eval_fraction`.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence

import numpy as np

from seqjax.data.pipeline import Windows
from seqjax.data.tokenizers import ByteTokenizer, CharTokenizer
from seqjax.errors import ConfigError

TOKENS = ("char", "byte")


class Concatenated:
    """Random-access sources one after another as one source (example `i` of the whole is found by offset)."""

    def __init__(self, sources: Sequence[Sequence]):
        self.sources = list(sources)
        self.starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.sources[k][i - int(self.starts[k])]


def expand(patterns: str, key: str = "text_files") -> list[str]:
    """The files the comma-separated glob `patterns` match (sorted per pattern, each once); a pattern that matches
    no file is a `ConfigError` on `key` naming it."""
    names = [p.strip() for p in str(patterns or "").split(",") if p.strip()]
    if not names:
        raise ConfigError(key, "no files given (one or more glob patterns, comma-separated, e.g. 'DIR/*.txt')")
    files: list[str] = []
    for pattern in names:
        found = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
        if not found:
            raise ConfigError(key, f"no file matches {pattern!r}")
        files += [f for f in found if f not in files]
    return files


def read_text(path: str, key: str = "text_files") -> str:
    """The UTF-8 text of `path`; an empty file or one that is not UTF-8 (the first bad byte's offset) is a
    `ConfigError` on `key` naming the file."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ConfigError(key, f"{path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path} is not UTF-8 text: byte {e.start} ({data[e.start]:#04x}) is invalid") from e


def split(text: str, eval_fraction: float) -> tuple[str, str]:
    """(train part, held-out part): the first `int(len(text) * (1 - eval_fraction))` characters and the rest."""
    cut = int(len(text) * (1 - eval_fraction))
    return text[:cut], text[cut:]


def read(
    text_files: str,
    seq_len: int,
    *,
    eval_files: str | None = None,
    eval_fraction: float = 0.1,
    tokens: str = "char",
    cache_dir: str | None = None,
) -> tuple[Concatenated, Concatenated, CharTokenizer | ByteTokenizer]:
    """(train windows, held-out windows, tokenizer) of the files (see the module's docstring). `cache_dir`: where the
    fitted characters are cached (None: not cached)."""
    if tokens not in TOKENS:
        raise ConfigError("tokens", f"{tokens!r} is unknown for text files ('char' or 'byte')")
    if eval_files:
        train_parts = [(f, read_text(f), "text_files") for f in expand(text_files)]
        eval_parts = [(f, read_text(f, "eval_files"), "eval_files") for f in expand(eval_files, "eval_files")]
    else:
        if not 0 < eval_fraction < 1:
            raise ConfigError("eval_fraction", f"{eval_fraction!r} is outside (0, 1) (the held-out share of each file)")
        train_parts, eval_parts = [], []
        for f in expand(text_files):
            train, held_out = split(read_text(f), eval_fraction)
            train_parts.append((f, train, "text_files"))
            eval_parts.append((f, held_out, "text_files"))
    cache = None
    if tokens == "byte":
        tok = ByteTokenizer()
    else:
        digest = hashlib.sha256("\0".join(t for _, t, _ in train_parts).encode("utf-8")).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"text-{digest}.chars.json") if cache_dir else None
        cached = cache is not None and os.path.exists(cache)
        tok = CharTokenizer.load(cache) if cached else CharTokenizer.fit([t for _, t, _ in train_parts])
    train_windows = _windows(train_parts, tok, seq_len, "train part" if not eval_files else "text")
    eval_windows = _windows(eval_parts, tok, seq_len, "held-out part" if not eval_files else "text")
    if cache is not None and not os.path.exists(cache):  # every file read and checked: only now is it written
        tok.save(cache)
    return train_windows, eval_windows, tok


def _windows(parts: list[tuple[str, str, str]], tok, seq_len: int, what: str) -> Concatenated:
    windows = []
    for path, text, key in parts:
        ids = tok.encode(text)
        if len(ids) < seq_len + 1:
            raise ConfigError(
                key,
                f"{path}: the {what} has {len(ids)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1} "
                "(a longer file, a smaller seq_len or another eval_fraction)",
            )
        windows.append(Windows(ids, seq_len))
    return Concatenated(windows)


__all__ = ["TOKENS", "Concatenated", "expand", "read", "read_text", "split"]
