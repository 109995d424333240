"""The wire protocol between ranks and the node's snapshot process (specified in docs/snapshot-protocol.md).

Frames are ``checkpoint/frames.py``'s (length-prefixed JSON objects, an ``"op"`` in requests and ``"ok"`` in
replies, no pickle, bounded reads; raw payloads carry bulk data between snapshot processes: erasure-code pieces);
they are re-exported here. The first request on a connection must be ``{"op": "hello", "token": ...}`` with the
job's secret token; anything else closes it.

This module does not import torch (the snapshot process uses it).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

from regrow.checkpoint.frames import MAX_FRAME as MAX_FRAME
from regrow.checkpoint.frames import MAX_RAW as MAX_RAW
from regrow.checkpoint.frames import FrameRefused as FrameRefused
from regrow.checkpoint.frames import ProtocolError as ProtocolError
from regrow.checkpoint.frames import RawCheck as RawCheck
from regrow.checkpoint.frames import check_raw_size as check_raw_size
from regrow.checkpoint.frames import recv_message as recv_message
from regrow.checkpoint.frames import send_frame as send_frame
from regrow.checkpoint.frames import send_message as send_message

TOKEN_ENV = "REGROW_SNAPSHOT_TOKEN"
"""The environment variable the launcher sets to the job's secret token (``secrets.token_hex(32)``)."""
MAX_TOKEN = 1024
"""Longest token accepted, in characters (the launcher's are 64): it bounds the hello frame."""


class SnapshotProcessLost(ConnectionError):
    """The snapshot process cannot be reached (refused, reset or timed out). Its shared memory is gone with it if
    it crashed: restart it with ``start_snapshot_process`` and restore from the universal checkpoint."""


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

