"""Length-prefixed JSON frames over a socket: the wire format of the snapshot protocol (``snapshot/protocol.py``)
and of the rank's snapshot copier (``snapshot/copier.py``). Torch-free, below both checkpoint kinds.

Every frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. No pickle: a frame can only
ever decode to plain data. A frame whose JSON holds ``"raw": n`` is followed by exactly n raw bytes, whose zlib
CRC32 is the frame's ``"raw_crc"``.

Reading is bounded: a frame longer than the reader's ``max_frame`` is refused from its length prefix and a raw
payload from its frame, before anything is read or allocated (:class:`FrameRefused`), and ``timeout_s`` bounds the
whole message, not each read, so a peer sending a byte now and then cannot hold a reader.

This module does not import torch (the snapshot process uses it).
"""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib
from collections.abc import Callable

MAX_FRAME = 16 << 20
"""Largest frame accepted (a tensor table of a very large shard is well under this)."""
MAX_RAW = 1 << 40
"""Largest raw payload accepted after a frame (bounds what a malformed header can make a reader allocate)."""
_LENGTH = struct.Struct(">I")


class ProtocolError(RuntimeError):
    """The peer sent something that is not a valid frame, or answered ``{"ok": false}``."""


class FrameRefused(ProtocolError):
    """A frame or its raw payload was refused from its declared size, before being read: the bytes that follow
    are still in the stream, so the connection cannot go on and must be closed."""


RawCheck = Callable[[dict, int], None]
"""Called with a frame and the raw payload size it announces, before any of the payload is read; raises
:class:`FrameRefused` when that payload must not be read."""


def check_raw_size(message: dict, size: int) -> None:
    """The default :data:`RawCheck`: any payload up to :data:`MAX_RAW`."""
    if size > MAX_RAW:
        raise FrameRefused(f"raw payload of {size} bytes exceeds MAX_RAW={MAX_RAW}")


class _Deadline:
    """Bounds a whole message read from ``sock``: each read gets the time left (no bound when ``timeout_s`` is
    None, the socket's own timeout then applies to each read)."""

    def __init__(self, sock: socket.socket, timeout_s: float | None) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.end = None if timeout_s is None else time.monotonic() + timeout_s

    def arm(self) -> None:
        if self.end is None:
            return
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the message did not arrive whole within {self.timeout_s} s")
        self.sock.settimeout(left)


def send_frame(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds MAX_FRAME={MAX_FRAME}")
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int, deadline: _Deadline) -> bytes:
    chunks, left = [], size
    while left:
        deadline.arm()
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionResetError("peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket, max_frame: int, deadline: _Deadline) -> dict:
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, deadline))
    if size > max_frame:
        raise FrameRefused(f"frame of {size} bytes exceeds the {max_frame} bytes accepted here")
    try:
        message = json.loads(_recv_exact(sock, size, deadline))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nesting too deep
        raise ProtocolError(f"frame is not JSON: {type(error).__name__}: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def send_message(sock: socket.socket, message: dict, payload: bytes | bytearray | memoryview | None = None) -> None:
    """Sends ``message`` and, when ``payload`` is given, its raw bytes after it (``"raw"`` and ``"raw_crc"`` are
    set here)."""
    if payload is None:
        send_frame(sock, message)
        return
    view = memoryview(payload).cast("B")
    send_frame(sock, dict(message, raw=view.nbytes, raw_crc=zlib.crc32(view)))
    sock.sendall(view)


def recv_message(sock: socket.socket, *, max_frame: int = MAX_FRAME, check_raw: RawCheck = check_raw_size,
                 timeout_s: float | None = None) -> tuple[dict, bytearray | None]:
    """Reads one frame and its raw payload if it announces one; the payload's CRC32 is checked.

    Limits: the frame is at most ``max_frame`` bytes; ``check_raw`` sees the announced payload size before any of
    it is read or allocated and refuses it by raising :class:`FrameRefused`; the whole message (frame and payload)
    must arrive within ``timeout_s`` (None: each read is bounded by the socket's timeout only)."""
    deadline = _Deadline(sock, timeout_s)
    message = _recv_frame(sock, max_frame, deadline)
    size = message.get("raw")
    if size is None:
        return message, None
    if type(size) is not int or size < 0:
        raise FrameRefused(f"raw payload size {size!r} is not an int >= 0")
    check_raw(message, size)
    expected_crc = message.get("raw_crc")
    payload = bytearray(size)
    view, got = memoryview(payload), 0
    while got < size:
        deadline.arm()
        count = sock.recv_into(view[got:], min(size - got, 1 << 22))
        if not count:
            raise ConnectionResetError("peer closed the connection inside a raw payload")
        got += count
    if zlib.crc32(payload) != expected_crc:
        raise ProtocolError(f"raw payload of {size} bytes fails its CRC32")
    return message, payload
