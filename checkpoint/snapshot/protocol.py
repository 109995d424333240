"""The wire protocol between ranks and the node's snapshot process (specified in docs/snapshot-protocol.md).

Every frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (an object with an ``"op"``
in requests, ``"ok"`` in replies). No pickle: a frame can only ever decode to plain data. A frame whose JSON holds
``"raw": n`` is followed by exactly n raw bytes (bulk data between snapshot processes: erasure-code pieces), whose
zlib CRC32 is the frame's ``"raw_crc"``. The first request on a
connection must be ``{"op": "hello", "token": ...}`` with the job's secret token; anything else closes it.

This module does not import torch (the snapshot process uses it).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import zlib
from collections.abc import Callable

TOKEN_ENV = "REGROW_SNAPSHOT_TOKEN"
"""The environment variable the launcher sets to the job's secret token (``secrets.token_hex(32)``)."""
MAX_FRAME = 16 << 20
"""Largest frame accepted (a tensor table of a very large shard is well under this)."""
MAX_RAW = 1 << 40
"""Largest raw payload accepted after a frame (bounds what a malformed header can make a reader allocate)."""
_LENGTH = struct.Struct(">I")


class ProtocolError(RuntimeError):
    """The peer sent something that is not a valid frame, or answered ``{"ok": false}``."""


class SnapshotProcessLost(ConnectionError):
    """The snapshot process cannot be reached (refused, reset or timed out). Its shared memory is gone with it if
    it crashed: restart it with ``start_snapshot_process`` and restore from the universal checkpoint."""


def send_frame(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds MAX_FRAME={MAX_FRAME}")
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionResetError("peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict:
    """Reads one frame; raises :class:`ProtocolError` for an oversized or non-JSON-object frame."""
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes exceeds MAX_FRAME={MAX_FRAME}")
    try:
        message = json.loads(_recv_exact(sock, size))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"frame is not JSON: {error}") from None
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


def recv_message(sock: socket.socket) -> tuple[dict, bytearray | None]:
    """Reads one frame and its raw payload if it announces one; the payload's CRC32 is checked."""
    message = recv_frame(sock)
    size = message.get("raw")
    if size is None:
        return message, None
    if not isinstance(size, int) or not 0 <= size <= MAX_RAW:
        raise ProtocolError(f"raw payload size {size!r} is not an int in [0, MAX_RAW={MAX_RAW}]")
    payload = bytearray(size)
    view, got = memoryview(payload), 0
    while got < size:
        count = sock.recv_into(view[got:], min(size - got, 1 << 22))
        if not count:
            raise ConnectionResetError("peer closed the connection inside a raw payload")
        got += count
    if zlib.crc32(payload) != message.get("raw_crc"):
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
        host, port = parse_address(address)
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as error:
            raise SnapshotProcessLost(f"cannot reach the snapshot process at {address}: {error}. Is it running? "
                                      f"(start it with `python -m regrow.checkpoint.node`)") from error
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request({"op": "hello", "token": token if token is not None else token_from_env()})

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

