"""The wire protocol between ranks and the node's snapshot process (specified in docs/snapshot-protocol.md).

Every frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (an object with an ``"op"``
in requests, ``"ok"`` in replies). No pickle: a frame can only ever decode to plain data. A frame whose JSON holds
``"raw": n`` is followed by exactly n raw bytes (bulk data between snapshot processes: erasure-code pieces), whose
zlib CRC32 is the frame's ``"raw_crc"``. The first request on a
connection must be ``{"op": "hello", "token": ...}`` with the job's secret token; anything else closes it.

Reading is bounded: a frame longer than the reader's ``max_frame`` is refused from its length prefix and a raw
payload from its frame, before anything is read or allocated (:class:`FrameRefused`), and ``timeout_s`` bounds the
whole message, not each read, so a peer sending a byte now and then cannot hold a reader.

This module does not import torch (the snapshot process uses it).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable

TOKEN_ENV = "REGROW_SNAPSHOT_TOKEN"
"""The environment variable the launcher sets to the job's secret token (``secrets.token_hex(32)``)."""
MAX_TOKEN = 1024
"""Longest token accepted, in characters (the launcher's are 64): it bounds the hello frame."""
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


class SnapshotProcessLost(ConnectionError):
    """The snapshot process cannot be reached (refused, reset or timed out). Its shared memory is gone with it if
    it crashed: restart it with ``start_snapshot_process`` and restore from the universal checkpoint."""


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


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; the error names the expected form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"snapshot process address {address!r} is not of the form host:port")
    return host, int(port)


def token_from_env() -> str:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise RuntimeError(f"{TOKEN_ENV} is not set: the launcher sets it to the job's snapshot token (the one the "
                           f"snapshot process was started with)")
    return token


def check_token(token: str) -> None:
    """Raises ValueError unless ``token`` is a usable snapshot token: non-empty, at most :data:`MAX_TOKEN`
    characters."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
        raise ValueError(f"the snapshot token ({TOKEN_ENV}) must be a non-empty string of at most {MAX_TOKEN} "
                         f"characters: use secrets.token_hex(32)")


class SnapshotClient:
    """One authenticated connection to the snapshot process; requests are serialised by a lock, so the training
    thread and a sink's finisher thread may share it.

    Every failure to reach the process (refused, reset, timeout) raises :class:`SnapshotProcessLost`; a request
    the process refuses raises :class:`ProtocolError` with its reason.
    """

    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        token = token if token is not None else token_from_env()
        check_token(token)
        host, port = parse_address(address)
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as error:
            raise SnapshotProcessLost(f"cannot reach the snapshot process at {address}: {error}. Is it running? "
                                      f"(start it with `python -m regrow.checkpoint.node`)") from error
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request({"op": "hello", "token": token})

    def request(self, message: dict) -> dict:
        """Sends ``message`` and returns the reply (``{"ok": true, ...}``)."""
        return self.exchange(message)[0]

    def exchange(self, message: dict,
                 payload: bytes | bytearray | memoryview | None = None) -> tuple[dict, bytearray | None]:
        """Sends ``message`` with an optional raw ``payload``; returns the reply and the reply's raw payload."""
        with self._lock:
            try:
                send_message(self._sock, message, payload)
                reply, raw = recv_message(self._sock)
            except (OSError, ConnectionError) as error:
                raise SnapshotProcessLost(
                    f"lost the snapshot process at {self.address} during {message.get('op')!r}: {error}. If it "
                    f"crashed, the snapshots it held are gone: restart it (start_snapshot_process) and restore "
                    f"from the universal checkpoint (recovery.from_checkpoint.restore_trainer)") from error
        if not reply.get("ok"):
            raise ProtocolError(f"snapshot process at {self.address} refused {message.get('op')!r}: "
                                f"{reply.get('error')}")
        return reply, raw

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def ec_group_of(node: int, group_size: int) -> list[int]:
    """The nodes of ``node``'s erasure-coding group: nodes are grouped in consecutive blocks of ``group_size``
    (just ``node`` when ``group_size`` is 0, coding off)."""
    if not group_size:
        return [node]
    first = node - node % group_size
    return list(range(first, first + group_size))


def ec_group_request(node: int, group_size: int, addresses: Callable[[int], str]) -> dict:
    """The ``ec_group`` request that tells ``node``'s snapshot process its place in its group and the group's
    addresses (``addresses(n)``: node n's snapshot process)."""
    group = ec_group_of(node, group_size)
    return {"op": "ec_group", "node": group.index(node), "peers": [addresses(member) for member in group]}


def request_once(address: str, message: dict, *, token: str | None = None, timeout_s: float = 30.0) -> dict:
    """One request on a connection of its own (opened, authenticated, closed): for callers that talk to a
    snapshot process now and then, such as launchers and coordinators."""
    client = SnapshotClient(address, token=token, timeout_s=timeout_s)
    try:
        return client.request(message)
    finally:
        client.close()

