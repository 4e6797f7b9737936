"""TensorBoard summaries without TensorFlow: an event file of scalar summaries, written by hand.

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (little-endian length, masked CRC-32C of the
length, the record, masked CRC-32C of the record) around `tensorflow.Event` protocol buffers. The loop only writes
scalars, which need five protobuf fields, so they are encoded here directly rather than through a writer library:
TensorFlow is not a dependency, and tensorboardX imports torch at import time when it is installed (1.1 s).

    writer = SummaryWriter(workdir + "/tensorboard")
    writer.scalars(step, {"train_loss": 0.3, "learning_rate": 1e-3})
    writer.close()
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 fields: negative values as ten-byte two's complement
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)  # Event.wall_time, double
    if step:
        out += _varint(2 << 3) + _varint(step)  # Event.step, int64
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())  # Event.file_version
    if summary is not None:
        out += _bytes_field(5, summary)  # Event.summary
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    # Summary.Value: tag (1, string), simple_value (2, float)
    return _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class SummaryWriter:
    """Appends scalar summaries to a new event file in `logdir` (TensorBoard: `tensorboard --logdir WORKDIR`).

    A resumed run opens a new file; TensorBoard shows the newest value for a step that was written twice.
    """

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event holding every finite numeric value of `values` (booleans and non-numbers are skipped)."""
        items = [
            _bytes_field(1, _scalar_value(tag, float(v)))
            for tag, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        if items:
            self._file.write(_record(_event(time.time(), int(step), summary=b"".join(items))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_scalars(path: str) -> list[tuple[int, dict[str, float]]]:
    """The (step, {tag: value}) events of one event file written by `SummaryWriter`, checksums verified."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        record = data[pos + 12 : pos + 12 + length]
        (record_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        if length_crc != _masked_crc(data[pos : pos + 8]) or record_crc != _masked_crc(record):
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += 16 + length
        step, values = _parse_event(record)
        if values:
            out.append((step, values))
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _parse_event(record: bytes) -> tuple[int, dict[str, float]]:
    step, values = 0, {}
    for number, value in _fields(record):
        if number == 2:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 5:
            for _, item in _fields(value):
                fields = dict(_fields(item))
                if 2 in fields:
                    values[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
    return step, values


__all__ = ["SummaryWriter", "crc32c", "read_scalars"]
