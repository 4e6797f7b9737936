"""TensorBoard event files written by hand: checked against tensorboardX's protobuf classes and CRC-32C."""

import struct

import numpy as np
import pytest

from seqjax.training.summary import SummaryWriter, crc32c, read_scalars


def test_crc32c_known_values():
    # RFC 3720's test vectors for CRC-32C.
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def _write(tmp_path):
    values = [(1, {"train_loss": 2.5, "learning_rate": 1e-3}), (7, {"train_loss": 0.25, "eval_acc": 0.75}),
              (2**40, {"x": -3.0})]  # fmt: skip
    with SummaryWriter(str(tmp_path)) as writer:
        for step, row in values:
            writer.scalars(step, {**row, "skipped_nan": float("nan"), "skipped_str": "a", "skipped_bool": True})
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("events.out.tfevents.")
    return str(path), values


def test_round_trip(tmp_path):
    path, values = _write(tmp_path)
    got = read_scalars(path)
    assert [s for s, _ in got] == [s for s, _ in values]
    for (_, row), (_, want) in zip(got, values, strict=True):
        assert sorted(row) == sorted(want)
        np.testing.assert_allclose([row[k] for k in want], [want[k] for k in want], rtol=1e-7)


def test_corruption_is_detected(tmp_path):
    path, _ = _write(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        read_scalars(path)


def test_records_decode_with_tensorboardx(tmp_path):
    """An independent reader: tensorboardX's compiled Event proto and its CRC-32C."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    from tensorboardX.crc32c import crc32c as reference_crc

    def masked(b):
        c = reference_crc(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    path, values = _write(tmp_path)
    data, pos, events = open(path, "rb").read(), 0, []
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        assert struct.unpack_from("<I", data, pos + 8)[0] == masked(data[pos : pos + 8])
        record = data[pos + 12 : pos + 12 + n]
        assert struct.unpack_from("<I", data, pos + 12 + n)[0] == masked(record)
        events.append(event_pb2.Event.FromString(record))
        pos += 16 + n
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [s for s, _ in values]
    for event, (_, want) in zip(events[1:], values, strict=True):
        got = {v.tag: v.simple_value for v in event.summary.value}
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-7)
        assert event.wall_time > 1.6e9
