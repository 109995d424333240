"""The threaded CRC32 equals zlib's CRC32 of the whole buffer."""

from __future__ import annotations

import os
import zlib

import pytest

from regrow.checkpoint.snapshot.crc import crc32, crc32_combine


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 65536 + 17])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_equals_zlib(size: int, threads: int) -> None:
    data = os.urandom(size)
    assert crc32(data, threads=threads, chunk_bytes=4096) == zlib.crc32(data)


def test_combine() -> None:
    a, b = os.urandom(1000), os.urandom(777)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b""), 0) == zlib.crc32(a)


def test_memoryview_of_a_slice() -> None:
    data = bytearray(os.urandom(100_000))
    view = memoryview(data)[123:99_000]
    assert crc32(view, threads=2, chunk_bytes=8192) == zlib.crc32(data[123:99_000])
