"""This snapshot process's place in its erasure-coding group, and its connections to the other members.

The transport is TCP with the snapshot protocol's token-checked frames, not the gloo group of the snapshot
processes: a collective group fails as a whole when one member dies, which is exactly when rebuild must work, and a
replacement would need a new group formed with the survivors; point-to-point connections with a timeout each name
the peer that failed and leave the others working.
"""

from __future__ import annotations

import threading

import numpy as np

from regrow.checkpoint.snapshot.protocol import ProtocolError, SnapshotClient, SnapshotProcessLost


class PeerLinks:
    """The group membership (this node's id, every member's address, set by ``ec_group``) and one connection per
    peer, opened at its first call and reopened after a failure.

    Thread-safe: the coding thread and a connection thread (a rebuild) call peers at once. The lock guards the
    membership and the connection table only, never a call on the network."""

    def __init__(self, token: str, *, timeout_s: float) -> None:
        self._token = token
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self.node: int | None = None
        """This process's node id in the group; None until the first ``ec_group``."""
        self.addresses: list[str] = []
        """Every member's address, by node id (this node's own included)."""
        self._clients: dict[int, SnapshotClient] = {}

    def set_group(self, node: int, addresses: list[str]) -> list[int]:
        """Sets this node's id and the members' addresses; returns the members whose address changed (they were
        replaced), whose old connections are closed."""
        with self._lock:
            changed = [i for i, address in enumerate(addresses)
                       if i < len(self.addresses) and self.addresses[i] != address]
            self.node, self.addresses = node, addresses
            stale = [self._clients.pop(i) for i in changed if i in self._clients]
        for client in stale:
            client.close()
        return changed

    def call(self, peer: int, message: dict,
             payload: bytes | bytearray | memoryview | np.ndarray | None = None) -> tuple[dict, bytearray | None]:
        """One request to node ``peer`` (limited by the timeout); a failure raises :class:`ProtocolError` naming
        the peer and drops its connection (reopened next time)."""
        try:
            return self._client(peer).exchange(message, None if payload is None else memoryview(payload))
        except (SnapshotProcessLost, ProtocolError, OSError) as error:
            with self._lock:
                client = self._clients.pop(peer, None)
            if client is not None:
                client.close()
            raise ProtocolError(f"peer node {peer} at {self.addresses[peer]}: {message['op']} failed: "
                                f"{error}") from None

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.close()

    def _client(self, peer: int) -> SnapshotClient:
        with self._lock:
            client = self._clients.get(peer)
            address = self.addresses[peer]
        if client is None:
            client = SnapshotClient(address, token=self._token, timeout_s=self._timeout_s)  # connects: not locked
            with self._lock:
                self._clients[peer] = client
        return client
