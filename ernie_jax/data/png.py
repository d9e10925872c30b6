"""Deterministic PNG encoding of palette images: the same bytes on every machine.

`zlib.compress` output depends on the zlib build (zlib, zlib-ng and patched forks emit different, equally
valid streams), so generated PNGs would differ between machines. This encoder writes the deflate stream
itself: one block with the fixed Huffman code, matches only at distance 1 (runs inside a row) and at the row
stride (a row equal to the one above), chosen by a fixed rule. Flat-colour drawings compress to a few
hundred bytes; any PNG decoder reads the result. CRC-32 and Adler-32 are fixed functions (zlib's are used).
"""

from __future__ import annotations

import bisect
import struct
import zlib

import numpy as np

_LEN_BASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163,
             195, 227, 258)
_LEN_EXTRA = (0,) * 8 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4,) * 4 + (5,) * 4 + (0,)
_DIST_BASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049,
              3073, 4097, 6145, 8193, 12289, 16385, 24577)
_DIST_EXTRA = (0, 0, 0, 0) + tuple(i // 2 for i in range(2, 28))
_MAX_MATCH, _MAX_DIST = 258, 32768


def _rev(code: int, nbits: int) -> int:
    return int(f"{code:0{nbits}b}"[::-1], 2)


def _fixed_literal_code(v: int) -> tuple[int, int]:
    """Fixed-Huffman literal / length code of symbol v (RFC 1951 §3.2.6), bit-reversed for LSB-first output."""
    code, n = ((0x30 + v, 8) if v < 144 else (0x190 + v - 144, 9) if v < 256 else (v - 256, 7) if v < 280
               else (0xC0 + v - 280, 8))
    return _rev(code, n), n


_LIT = [_fixed_literal_code(v) for v in range(288)]
_LEN_CODE = [0] * (_MAX_MATCH + 1)  # length -> index into _LEN_BASE
for _i, _b in enumerate(_LEN_BASE):
    for _l in range(_b, _MAX_MATCH + 1):
        _LEN_CODE[_l] = _i


class _Bits:
    """LSB-first bit writer (deflate's order)."""

    def __init__(self):
        self.acc, self.n = 0, 0

    def put(self, value: int, nbits: int) -> None:
        self.acc |= value << self.n
        self.n += nbits

    def literal(self, v: int) -> None:
        self.put(*_LIT[v])

    def match(self, length: int, dist: int) -> None:
        i = _LEN_CODE[length]
        self.literal(257 + i)
        self.put(length - _LEN_BASE[i], _LEN_EXTRA[i])
        j = bisect.bisect_right(_DIST_BASE, dist) - 1
        self.put(_rev(j, 5), 5)
        self.put(dist - _DIST_BASE[j], _DIST_EXTRA[j])

    def repeat(self, length: int, dist: int) -> None:
        """`length` (>= 3) bytes copied from `dist` back, as matches of 3..258 bytes."""
        while length > 0:
            m = min(_MAX_MATCH, length)
            if 0 < length - m < 3:  # never leave a tail too short for a match
                m = length - 3
            self.match(m, dist)
            length -= m

    def bytes(self) -> bytes:
        return self.acc.to_bytes((self.n + 7) // 8, "little")


def _deflate(rows: np.ndarray) -> bytes:
    """zlib stream of the PNG scanlines of `rows` [H, W] uint8 (filter type 0 on every row)."""
    h, w = rows.shape
    stride = w + 1
    if stride > _MAX_DIST:
        raise ValueError(f"image width {w} too large for this encoder (max {_MAX_DIST - 1})")
    repeats_above = np.concatenate([[False], np.all(rows[1:] == rows[:-1], axis=1)]).tolist()
    b = _Bits()
    b.put(1, 1)  # BFINAL
    b.put(1, 2)  # BTYPE = fixed Huffman
    y = 0
    while y < h:
        same = y
        while same < h and repeats_above[same]:
            same += 1
        if (same - y) * stride >= 3:  # rows y..same-1 repeat row y-1: one copy at distance `stride`
            b.repeat((same - y) * stride, stride)
            y = same
            continue
        b.literal(0)  # filter type: none
        row = rows[y]
        cuts = (np.flatnonzero(np.diff(row)) + 1).tolist()
        for s, e in zip([0] + cuts, cuts + [w]):
            v = int(row[s])
            b.literal(v)
            rest = e - s - 1
            if rest >= 3:
                b.repeat(rest, 1)
            else:
                for _ in range(rest):
                    b.literal(v)
        y += 1
    b.literal(256)  # end of block
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    return b"\x78\x01" + b.bytes() + struct.pack(">I", zlib.adler32(raw))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_palette_png(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """PNG bytes of an indexed-colour image.

    indices: [H, W] integer palette indices; palette: [K, 3] uint8 RGB (K <= 256).
    """
    indices = np.asarray(indices)
    palette = np.asarray(palette, np.uint8)
    if indices.ndim != 2 or min(indices.shape) < 1:
        raise ValueError(f"indices must be [H, W] with H, W >= 1, got shape {indices.shape}")
    if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= len(palette) <= 256:
        raise ValueError(f"palette must be [K, 3] with 1 <= K <= 256, got shape {palette.shape}")
    if indices.min() < 0 or indices.max() >= len(palette):
        raise ValueError(f"palette indices must lie in [0, {len(palette)})")
    h, w = indices.shape
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)  # 8-bit indexed, deflate, adaptive filter, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"PLTE", palette.tobytes())
            + _chunk(b"IDAT", _deflate(indices.astype(np.uint8))) + _chunk(b"IEND", b""))
