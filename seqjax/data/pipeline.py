"""The input pipeline: a random-access source -> examples of batch `step` -> collate (tokenize, pad or pack) ->
this process's rows -> (optionally) placed on the devices, a few steps ahead on a background thread.

Batch `step` is a pure function of `(seed, step)`: the stream visits the examples epoch after epoch, each epoch in
its own order (a permutation drawn from `(seed, epoch)`), and batch `step` holds stream positions
`[step * B, (step + 1) * B)`. So the iterator's position is the step the checkpoint already holds: a resumed run
reads exactly the batches `k, k + 1, ...` an uninterrupted one would, and saving the position costs nothing
(restoring it costs one permutation of the source's indices, `benchmarks/input.py` measures it).

    source = tfds.data_source("seq_tasks/sort", split="train", data_dir=...)  # or any Sequence of examples
    pipe = Pipeline(source, batch_size=64, seed=0, collate=Seq2SeqCollate(vocab, 16, 18))
    batch = pipe(step)                 # the global batch: dict of numpy arrays [64, ...]
    rows = pipe.process_batch(step)    # this process's rows only (multi-host): reads only those examples

Sources are anything with `__len__` and `__getitem__` (`tfds.data_source`'s ArrayRecord sources, lists, `Windows`
over one long token array). Examples are dicts of numpy values; a collate function turns a list of them into a
batch. Splitting per device is `seqjax.training.Parallel.put_batch`, which `place=` can run on the background
thread.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from seqjax.data.tokenizers import PAD

Batch = dict[str, np.ndarray]


class Pipeline:
    """Batches of a random-access source, each a pure function of `(seed, step)` (see the module docstring).

    Args:
      source: `len(source)` examples, `source[i]` one example (dict of numpy values).
      batch_size: the global batch size.
      seed: the shuffling seed; `shuffle=False` reads the source in order, epoch after epoch.
      collate: list of examples -> batch (default: stack every key).
      process_index, process_count: this process among several; `process_batch` reads only its rows.
      prefetch: compute this many steps ahead on a background thread (0: none).
      place: applied to each batch on that thread (e.g. `Parallel.put_batch`, which moves it to the devices).
    """

    def __init__(self, source: Sequence, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 collate: Callable[[list[dict]], Batch] | None = None, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 0, place: Callable | None = None):  # fmt: skip
        if len(source) == 0:
            raise ValueError("Pipeline: the source is empty")
        if batch_size < 1:
            raise ValueError(f"Pipeline: batch_size must be >= 1, got {batch_size}")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise ValueError(f"Pipeline: batch_size={batch_size} must be divisible by the {process_count} processes")
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.collate = collate or stack
        self.process_index, self.process_count = process_index, process_count
        self.num_examples = len(source)
        self.place = place
        self._prefetch = _Prefetcher(self.process_batch, prefetch) if prefetch else None

    @functools.lru_cache(maxsize=4)  # noqa: B019 (the pipeline lives as long as its run)
    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def indices(self, step: int) -> np.ndarray:
        """The source indices of the global batch `step`, in row order."""
        positions = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._order(int(e))[offsets[sel]]
        return out

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.num_examples

    def _read(self, indices: np.ndarray) -> list[dict]:
        return read_many(self.source, indices.tolist())

    def batch(self, step: int) -> Batch:
        """The global batch `step`."""
        return self.collate(self._read(self.indices(step)))

    def process_batch(self, step: int) -> Any:
        """This process's rows of batch `step` (all of them with one process), placed if `place` was given."""
        if self._prefetch is not None and threading.current_thread() is not self._prefetch.thread:
            return self._prefetch.get(step)
        rows = self.batch_size // self.process_count
        idx = self.indices(step)[self.process_index * rows : (self.process_index + 1) * rows]
        batch = self.collate(self._read(idx))
        return self.place(batch) if self.place is not None else batch

    __call__ = process_batch

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()


class _Prefetcher:
    """Computes `fn(step + 1) .. fn(step + depth)` on one background thread while step `step` is consumed; a
    request out of sequence (a resume, a jump) is computed directly and restarts the read-ahead from there."""

    def __init__(self, fn: Callable[[int], Any], depth: int):
        self.fn, self.depth = fn, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="seqjax-prefetch")
        self.thread = self.pool.submit(threading.current_thread).result()
        self.pending: dict[int, Future] = {}

    def get(self, step: int) -> Any:
        future = self.pending.pop(step, None)
        for s in [s for s in self.pending if s < step or s > step + self.depth]:
            self.pending.pop(s).cancel()
        for s in range(step + 1, step + 1 + self.depth):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.fn, s)
        return future.result() if future is not None else self.pool.submit(self.fn, step).result()

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True)


# -- sources -----------------------------------------------------------------------------------------------------


class Windows:
    """Fixed-length windows over one long token array, as a random-access source: window `i` starts at
    `i * stride` and holds `length + 1` tokens (`inputs` = the first `length`, `targets` = the last `length`)."""

    def __init__(self, tokens: np.ndarray, length: int, stride: int | None = None):
        self.tokens, self.length, self.stride = np.asarray(tokens), length, stride or length
        if len(self.tokens) < length + 1:
            raise ValueError(f"Windows: {len(self.tokens)} tokens are fewer than one window of {length + 1}")

    def __len__(self) -> int:
        return (len(self.tokens) - self.length - 1) // self.stride + 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        w = self.tokens[i * self.stride : i * self.stride + self.length + 1]
        return {"inputs": w[:-1], "targets": w[1:]}


class Mapped:
    """`fn(source[i])` as a random-access source (tokenize, decode, ... per example)."""

    def __init__(self, source: Sequence, fn: Callable[[Any], dict]):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return self.fn(self.source[i])

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self.fn(e) for e in read_many(self.source, indices)]


def read_many(source: Sequence, indices: list[int]) -> list:
    """`source[i]` for each index, in one call where the source reads a list at once (ArrayRecord sources)."""
    many = getattr(source, "__getitems__", None)
    if many is not None:
        try:
            return list(many(indices))
        except TypeError:  # tfds.testing.mock_data's sources advertise batched reads that fail
            pass
    return [source[i] for i in indices]


# -- collate functions ---------------------------------------------------------------------------------------------


def stack(examples: list[dict]) -> Batch:
    """Every key stacked (examples of equal shapes)."""
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def pad(sequences: Sequence[np.ndarray], length: int, value: int = PAD) -> np.ndarray:
    """[N, length] int32: each sequence cut or right-padded to `length`."""
    out = np.full((len(sequences), length), value, np.int32)
    for row, seq in enumerate(sequences):
        seq = np.asarray(seq)[:length]
        out[row, : len(seq)] = seq
    return out


def pack(sequences: Sequence[np.ndarray], rows: int, length: int) -> Batch:
    """Greedy packing of sequences into `rows` rows of `length` tokens, in order; a sequence that does not fit in
    the current row starts the next one (a sequence longer than a row is cut); what does not fit in `rows` rows is
    dropped. Returns `tokens`, `segment_ids` (1, 2, ... per sequence in a row; 0 for padding) and `positions`
    (0.. within each sequence), each [rows, length] int32, and `num_packed` (how many sequences went in)."""
    tokens = np.full((rows, length), PAD, np.int32)
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    row, col, seg, packed = 0, 0, 0, 0
    for seq in sequences:
        seq = np.asarray(seq)[:length]
        if col + len(seq) > length:
            row, col, seg = row + 1, 0, 0
        if row >= rows:
            break
        seg += 1
        tokens[row, col : col + len(seq)] = seq
        segments[row, col : col + len(seq)] = seg
        positions[row, col : col + len(seq)] = np.arange(len(seq))
        col += len(seq)
        packed += 1
    return {"tokens": tokens, "segment_ids": segments, "positions": positions, "num_packed": np.int32(packed)}


def packed_lm_targets(tokens: np.ndarray, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token labels and weights of packed rows (`pack`'s `tokens` and `segment_ids`, [rows, length]), for a
    decoder-only LM called with those `segment_ids` and `positions`: `labels[:, t] = tokens[:, t + 1]`, with weight
    1 only where t + 1 is in the same sequence as t (not across a boundary into the next sequence, not on padding,
    not past the row's end). Returns (labels [rows, length] int32, weights [rows, length] float32)."""
    tokens, segment_ids = np.asarray(tokens), np.asarray(segment_ids)
    labels = np.zeros_like(tokens, np.int32)
    labels[:, :-1] = tokens[:, 1:]
    weights = np.zeros(tokens.shape, np.float32)
    weights[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    return labels, weights


class Seq2SeqCollate:
    """For transduction data (`inputs`, `targets`): `inputs` padded to `input_length`; `decoder_inputs` = [bos] +
    targets and `labels` = targets + [eos], padded to `target_length`; `weights` 1 on real label tokens."""

    def __init__(self, bos: int, eos: int, input_length: int, target_length: int):
        self.bos, self.eos, self.input_length, self.target_length = bos, eos, input_length, target_length

    def __call__(self, examples: list[dict]) -> Batch:
        targets = [np.asarray(e["targets"]) for e in examples]
        labels = pad([np.append(t, self.eos) for t in targets], self.target_length)
        return {
            "inputs": pad([e["inputs"] for e in examples], self.input_length),
            "decoder_inputs": pad([np.insert(t, 0, self.bos) for t in targets], self.target_length),
            "labels": labels,
            "weights": (labels != PAD).astype(np.float32),
        }


__all__ = [
    "Mapped",
    "Pipeline",
    "Seq2SeqCollate",
    "Windows",
    "pack",
    "packed_lm_targets",
    "pad",
    "read_many",
    "stack",
]
