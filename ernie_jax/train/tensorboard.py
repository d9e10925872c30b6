"""A minimal TensorBoard event-file writer for scalars, with no dependency.

tensorboardX writes the same files, but importing it imports torch when torch is installed (~7 s at
start-up; `tensorboardX/writer.py` does `import torch` at module level). An event file is a sequence of
TFRecords (`uint64 length, uint32 masked-crc32c(length), data, uint32 masked-crc32c(data)`), each holding
a serialized `Event` proto. We encode the few fields a scalar needs by hand, byte-for-byte as tensorboardX
does: the first event carries `file_version = "brain.Event:2"`, every later one
`wall_time, step, summary { value { tag, simple_value } }`; file name and tag cleaning as tensorboardX.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time

_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w\.]")  # tensorboardX's summary._clean_tag


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    x = crc32c(data)
    return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields: negatives as two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """A serialized `Event` (proto3: a zero step is left out, as protobuf does)."""
    out = _field(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars is not None:
        summary = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5)
                                             + struct.pack("<f", value)) for tag, value in scalars.items())
        out += _length_delimited(5, summary)
    return out


def clean_tag(tag: str) -> str:
    return _INVALID_TAG_CHARACTERS.sub("_", tag).lstrip("/")


class EventWriter:
    """Writes scalars to `logdir/events.out.tfevents.<time>.<host>`, one event per scalar (as
    tensorboardX's `add_scalar`); each `scalars` call is flushed."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}")
        self._f = open(self.path, "wb")
        self._write(encode_event(time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", masked_crc32c(header)) + data
                      + struct.pack("<I", masked_crc32c(data)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._write(encode_event(time.time(), step, scalars={clean_tag(tag): float(value)}))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
