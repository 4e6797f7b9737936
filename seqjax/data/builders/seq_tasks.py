"""`seq_tasks`: transduction tasks (inputs -> targets) whose success is measured by exact-match accuracy.

Symbols are the integers 1..vocab_size (0 is left for padding; see `vocabulary`). Inputs are uniform random
sequences with lengths uniform in [min_len, max_len]. The tasks (`transduce` is the rule, in numpy):

- copy: the input.                               reverse: the input reversed.        sort: the input sorted.
- trim: the input without its last `trim` elements (trim=2: [1,2,3,4,5,6,7] -> [1,2,3,4,5]).
- omit: only the elements at triangular positions 0, 1, 3, 6, 10, ... ([1,2,3,4,5,6,7] -> [1,2,4,7]).
- permute: shifted by `shift` places, the first ones dropped (shift=1: [1,2,3,4,5,6,7] -> [2,3,4,5,6,7]).
- addition: "a+b" -> "a+b"'s sum, as characters: digits '0'..'9' are symbols 1..10 and '+' is 11 (numbers of
  1..`max_digits` digits, no leading zeros); `encode_addition` / `decode_digits` convert.

The three middle rules are the seed's hard cases (a trimmed sequence, one with elements omitted, a shifted one),
generalised to random lengths and vocabularies.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from seqjax.data.builders.seeded import SeededBuilder, SeededConfig

TASKS = ("copy", "reverse", "sort", "trim", "omit", "permute", "addition")
ADDITION_VOCAB = 11  # '0'..'9' -> 1..10, '+' -> 11


@dataclasses.dataclass(eq=False)
class SeqTaskConfig(SeededConfig):
    """`task` one of TASKS; sequences of `min_len`..`max_len` symbols from 1..`vocab_size` (addition: numbers of
    1..`max_digits` digits, and the vocabulary is fixed at 11)."""

    task: str = "copy"
    vocab_size: int = 10
    min_len: int = 4
    max_len: int = 16
    trim: int = 2
    shift: int = 1
    max_digits: int = 3

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"SeqTaskConfig.task={self.task!r} is unknown; use one of {TASKS}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"SeqTaskConfig needs 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.task == "trim" and not 0 <= self.trim < self.min_len:
            raise ValueError(f"SeqTaskConfig.trim={self.trim} must be in [0, min_len={self.min_len})")
        if self.task == "permute" and not 0 <= self.shift < self.min_len:
            raise ValueError(f"SeqTaskConfig.shift={self.shift} must be in [0, min_len={self.min_len})")
        if self.vocab_size < 1 or self.max_digits < 1:
            raise ValueError("SeqTaskConfig.vocab_size and max_digits must be >= 1")


def config(task: str, **kwargs) -> SeqTaskConfig:
    """A config named after the task (and its non-default fields), e.g. `config("sort", num_train=256)`."""
    extra = "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
    return SeqTaskConfig(name=f"{task}{extra}", task=task, **kwargs)


def vocabulary(cfg: SeqTaskConfig) -> dict[str, int]:
    """Token ids for a model: pad 0, the symbols 1..V, then bos V+1 and eos V+2; `size` = V+3."""
    v = ADDITION_VOCAB if cfg.task == "addition" else cfg.vocab_size
    return {"pad": 0, "bos": v + 1, "eos": v + 2, "size": v + 3}


def triangular_positions(length: int) -> np.ndarray:
    k = np.arange(length)
    tri = k * (k + 1) // 2
    return tri[tri < length]


def transduce(task: str, inputs: np.ndarray, *, trim: int = 2, shift: int = 1) -> np.ndarray:
    """The target of `inputs` under `task` (not addition, whose inputs are characters)."""
    x = np.asarray(inputs, np.int32)
    if task == "copy":
        return x.copy()
    if task == "reverse":
        return x[::-1].copy()
    if task == "sort":
        return np.sort(x)
    if task == "trim":
        return x[: len(x) - trim].copy()
    if task == "omit":
        return x[triangular_positions(len(x))]
    if task == "permute":
        return x[shift:].copy()
    raise ValueError(f"transduce: unknown task {task!r}")


def encode_addition(text: str) -> np.ndarray:
    table = {**{str(d): d + 1 for d in range(10)}, "+": 11}
    return np.asarray([table[c] for c in text], np.int32)


def decode_digits(symbols) -> str:
    return "".join("+" if s == 11 else str(int(s) - 1) for s in symbols)


class SeqTasks(SeededBuilder):
    """Transduction tasks; one config per task (see the module docstring)."""

    BUILDER_CONFIGS = [config(t) for t in TASKS]  # noqa: RUF012
    DESCRIPTION = __doc__

    def _features(self):
        return tfds.features.FeaturesDict(
            {
                "inputs": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "targets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }
        )

    def _example(self, rng: np.random.Generator, index: int) -> dict:
        cfg = self.builder_config
        if cfg.task == "addition":
            a, b = (_number(rng, cfg.max_digits) for _ in range(2))
            return {"inputs": encode_addition(f"{a}+{b}"), "targets": encode_addition(str(a + b))}
        length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        x = rng.integers(1, cfg.vocab_size + 1, size=length).astype(np.int32)
        return {"inputs": x, "targets": transduce(cfg.task, x, trim=cfg.trim, shift=cfg.shift)}


def _number(rng: np.random.Generator, max_digits: int) -> int:
    digits = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits))


__all__ = [
    "TASKS",
    "SeqTaskConfig",
    "SeqTasks",
    "config",
    "decode_digits",
    "encode_addition",
    "transduce",
    "triangular_positions",
    "vocabulary",
]
