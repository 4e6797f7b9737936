"""The input pipeline: exact resume by index arithmetic, epochs, per-process and per-device splits, collation,
and the import promise (no TensorFlow, no TFDS for the layers)."""

import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from seqjax.data import hide_accelerators_from_tensorflow
from seqjax.data.pipeline import Pipeline, Seq2SeqCollate, Windows, pack, packed_lm_targets, pad, stack

SOURCE = [{"x": np.array([i, 2 * i], np.int32), "id": np.int32(i)} for i in range(50)]


def test_restored_iterator_yields_the_same_batches():
    """Batches k, k+1, ... of a pipeline started at k equal an uninterrupted one's (prefetching in both)."""
    whole = Pipeline(SOURCE, 8, seed=3, prefetch=2, process_index=0, process_count=1)
    uninterrupted = [whole(s) for s in range(20)]  # 160 examples: three epoch boundaries crossed
    resumed = Pipeline(SOURCE, 8, seed=3, prefetch=2, process_index=0, process_count=1)
    for s in range(13, 20):
        for key in ("x", "id"):
            np.testing.assert_array_equal(resumed(s)[key], uninterrupted[s][key])
    whole.close()
    resumed.close()


def test_each_epoch_visits_every_example_once_in_its_own_order():
    pipe = Pipeline(SOURCE, 10, seed=0, process_index=0, process_count=1)
    epoch0 = np.concatenate([pipe.batch(s)["id"] for s in range(5)])
    epoch1 = np.concatenate([pipe.batch(s)["id"] for s in range(5, 10)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0.tolist() != epoch1.tolist() and epoch0.tolist() != list(range(50))
    other = Pipeline(SOURCE, 10, seed=1, process_index=0, process_count=1)
    assert other.batch(0)["id"].tolist() != pipe.batch(0)["id"].tolist()
    ordered = Pipeline(SOURCE, 8, shuffle=False, process_index=0, process_count=1)
    assert ordered.batch(6)["id"].tolist() == [48, 49, 0, 1, 2, 3, 4, 5]  # across the epoch boundary


def test_processes_and_devices_reassemble_the_global_batch():
    """Four processes' rows concatenate to the global batch; split over 8 devices (jit's sharding and pmap's
    layout) each device holds its rows."""
    from seqjax.training.parallel import Parallel

    glob = Pipeline(SOURCE, 16, seed=5, process_index=0, process_count=1).batch(7)
    parts = [Pipeline(SOURCE, 16, seed=5, process_index=i, process_count=4).process_batch(7) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), glob["x"])
    assert jax.device_count() == 8
    sharded = Parallel("jit").put_batch(glob)["x"]
    for shard in sharded.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), glob["x"][shard.index])
        assert shard.data.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(sharded), glob["x"])
    pmapped = Parallel("pmap").put_batch(glob)["x"]
    assert pmapped.shape == (8, 2, 2)
    np.testing.assert_array_equal(pmapped.reshape(16, 2), glob["x"])
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        Pipeline(SOURCE, 16, process_index=0, process_count=3)


def test_pipeline_places_batches_on_the_background_thread():
    from seqjax.training.parallel import Parallel

    par = Parallel("jit")
    pipe = Pipeline(SOURCE, 16, seed=2, prefetch=2, place=par.put_batch, process_index=0, process_count=1)
    for s in range(3):
        got = pipe(s)["x"]
        assert isinstance(got, jax.Array) and len(got.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(got), pipe.batch(s)["x"])
    pipe.close()


def test_pad_pack_and_collate():
    assert pad([np.array([5, 6, 7]), np.array([8])], 2).tolist() == [[5, 6], [8, 0]]
    packed = pack([np.array([5, 6, 7]), np.array([8, 9]), np.array([4, 4, 4, 4]), np.array([3])], rows=2, length=5)
    assert packed["tokens"].tolist() == [[5, 6, 7, 8, 9], [4, 4, 4, 4, 3]]
    assert packed["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 2]]
    assert packed["positions"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert int(packed["num_packed"]) == 4
    dropped = pack([np.array([1, 1, 1])] * 3, rows=1, length=4)
    assert int(dropped["num_packed"]) == 1 and dropped["segment_ids"].tolist() == [[1, 1, 1, 0]]
    batch = Seq2SeqCollate(bos=11, eos=12, input_length=4, target_length=4)(
        [{"inputs": np.array([3, 1, 2]), "targets": np.array([1, 2, 3])}, {"inputs": [5], "targets": [5]}]
    )
    assert batch["inputs"].tolist() == [[3, 1, 2, 0], [5, 0, 0, 0]]
    assert batch["decoder_inputs"].tolist() == [[11, 1, 2, 3], [11, 5, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, 12], [5, 12, 0, 0]]
    assert batch["weights"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert stack(SOURCE[:3])["x"].shape == (3, 2)


def test_windows():
    w = Windows(np.arange(20), length=4, stride=3)
    assert len(w) == 6  # starts 0, 3, ..., 15; the last needs tokens 15..19
    assert w[5]["inputs"].tolist() == [15, 16, 17, 18] and w[5]["targets"].tolist() == [16, 17, 18, 19]
    with pytest.raises(IndexError):
        w[6]
    with pytest.raises(ValueError, match="fewer than one window"):
        Windows(np.arange(3), length=4)


def test_seq_tasks_through_tfds_data_source(tmp_path):
    import tensorflow_datasets as tfds

    from seqjax.data.builders import build, seq_tasks

    cfg = seq_tasks.config("reverse", num_train=40, num_test=8, max_len=6)
    build("seq_tasks", str(tmp_path), cfg)
    source = tfds.data_source(f"seq_tasks/{cfg.name}", split="train", data_dir=str(tmp_path), download=False)
    vocab = seq_tasks.vocabulary(cfg)
    pipe = Pipeline(source, 8, seed=0, collate=Seq2SeqCollate(vocab["bos"], vocab["eos"], 6, 7),
                    process_index=0, process_count=1)  # fmt: skip
    batch = pipe(3)
    for row in range(8):
        n = int(batch["weights"][row].sum()) - 1
        np.testing.assert_array_equal(batch["labels"][row, :n], batch["inputs"][row, :n][::-1])


def test_layers_import_neither_tensorflow_nor_tfds():
    code = (
        "import sys, seqjax.nn, seqjax.models, seqjax.training, seqjax.decoding, seqjax.data.tokenizers;"
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; assert not bad, bad;"
        "import seqjax.data.builders, seqjax.data.pipeline; assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})


def test_tensorflow_if_imported_is_kept_off_accelerators(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(config=types.SimpleNamespace(set_visible_devices=lambda d, k: calls.append((d, k))))
    monkeypatch.setitem(sys.modules, "tensorflow", fake)
    hide_accelerators_from_tensorflow()
    assert calls == [([], "GPU"), ([], "TPU")]


def test_packed_lm_targets_stop_at_segment_boundaries_and_padding():
    packed = pack([np.array([5, 6, 7]), np.array([8, 9]), np.array([4, 4, 4, 4])], rows=2, length=6)
    labels, weights = packed_lm_targets(packed["tokens"], packed["segment_ids"])
    assert packed["tokens"].tolist() == [[5, 6, 7, 8, 9, 0], [4, 4, 4, 4, 0, 0]]
    assert labels.tolist() == [[6, 7, 8, 9, 0, 0], [4, 4, 4, 0, 0, 0]]
    assert weights.tolist() == [[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]]  # 7 -> 8 crosses into the next sequence
    assert labels.dtype == np.int32 and weights.dtype == np.float32
