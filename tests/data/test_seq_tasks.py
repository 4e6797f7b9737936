"""The seq_tasks builder: offline builds, determinism, the seed's hard cases, and every target follows its rule."""

import glob
import os

import numpy as np
import pytest

from seqjax.data.builders import build, seq_tasks
from seqjax.data.builders.seq_tasks import config, decode_digits, transduce

SEED_SEQUENCE = np.arange(1, 8)


def test_the_seeds_examples():
    """From [1..7]: trimmed [1..5], omitted [1,2,4,7], shifted [2..7] (and the plain rules)."""
    assert transduce("trim", SEED_SEQUENCE).tolist() == [1, 2, 3, 4, 5]
    assert transduce("omit", SEED_SEQUENCE).tolist() == [1, 2, 4, 7]
    assert transduce("permute", SEED_SEQUENCE).tolist() == [2, 3, 4, 5, 6, 7]
    assert transduce("reverse", SEED_SEQUENCE).tolist() == [7, 6, 5, 4, 3, 2, 1]
    assert transduce("sort", np.array([3, 1, 2])).tolist() == [1, 2, 3]
    assert transduce("trim", SEED_SEQUENCE, trim=3).tolist() == [1, 2, 3, 4]
    assert transduce("permute", SEED_SEQUENCE, shift=3).tolist() == [4, 5, 6, 7]


def _shards(path):
    return {
        os.path.relpath(p, path): open(p, "rb").read() for p in glob.glob(f"{path}/**/*.array_record*", recursive=True)
    }


@pytest.mark.parametrize("task", seq_tasks.TASKS)
def test_builds_offline_and_targets_follow_the_rule(tmp_path, task):
    cfg = config(task, num_train=64, num_test=16, min_len=5, max_len=9, vocab_size=7)
    builder = build("seq_tasks", str(tmp_path), cfg)  # how long it takes: benchmarks/input.py --parts builds
    source = builder.as_data_source()
    assert len(source["train"]) == 64 and len(source["test"]) == 16
    vocab = seq_tasks.vocabulary(cfg)
    for split in ("train", "test"):
        for i in range(len(source[split])):
            ex = source[split][i]
            assert set(ex) == {"inputs", "targets"} and ex["inputs"].dtype == np.int32
            x, y = ex["inputs"], ex["targets"]
            assert x.min() >= 1 and x.max() < vocab["bos"] and (len(y) == 0 or y.min() >= 1)
            if task == "addition":
                a, b = decode_digits(x).split("+")
                assert int(decode_digits(y)) == int(a) + int(b) and len(a) <= 3 and len(b) <= 3
            else:
                assert 5 <= len(x) <= 9 and x.max() <= 7
                np.testing.assert_array_equal(y, transduce(task, x))
    # Stored examples are the ones the config regenerates (the order on disk is TFDS's shuffle of the keys).
    stored = sorted(tuple(source["train"][i]["inputs"]) for i in range(64))
    assert stored == sorted(tuple(builder.example("train", i)["inputs"]) for i in range(64))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = build("seq_tasks", str(tmp_path / "a"), config("sort", num_train=32, num_test=8))
    b = build("seq_tasks", str(tmp_path / "b"), config("sort", num_train=32, num_test=8))
    c = build("seq_tasks", str(tmp_path / "c"), config("sort", num_train=32, num_test=8, seed=1))
    sa, sb, sc = (_shards(str(tmp_path / d)) for d in "abc")
    assert sa and sa == sb
    assert [v for _, v in sorted(sa.items())] != [v for _, v in sorted(sc.items())]
    del a, b, c


def test_bad_configs():
    with pytest.raises(ValueError, match="task='shuffle'"):
        seq_tasks.SeqTaskConfig(name="x", task="shuffle")
    with pytest.raises(ValueError, match="trim=5"):
        seq_tasks.SeqTaskConfig(name="x", task="trim", trim=5, min_len=4)
