"""The snapshot process's server: it accepts the ranks' (and the peers') connections, checks their token and
answers the protocol (docs/snapshot-protocol.md), on one thread per connection.

The requests are handed to the process's parts: the segment slots (``slots.py``), the erasure coding with the
group's peers (``peers.py``, when ``erasure.ec_group_size`` > 0) and the persistence of snapshots as universal
checkpoints (``persister.py``, when ``persist.persist_every`` > 0). The server only decides what a COMMIT or an
ATTACH means for each of them.
"""

from __future__ import annotations

import hmac
import secrets
import selectors
import socket
import threading

from regrow.checkpoint.node.erasure import ErasureError
from regrow.checkpoint.node.log import log
from regrow.checkpoint.node.peers import PeerCoding
from regrow.checkpoint.node.persist import PERSIST_HOLDER
from regrow.checkpoint.node.persister import Persister, PersistFeed
from regrow.checkpoint.node.process import SnapshotProcessConfig
from regrow.checkpoint.node.shm import ShmSpaceError, check_space, remove_segments
from regrow.checkpoint.node.slots import SlotTable
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, ProtocolError, parse_address, recv_message, send_message


class SnapshotServer:
    """Owns the segments and answers the protocol; one thread per authenticated connection, so a slow or silent
    client never blocks another. Use :meth:`serve_forever` (returns after SHUTDOWN or :meth:`shutdown`).

    Construction fails (before listening) when ``shm_dir`` lacks ``expected_bytes`` or ``persist_dir`` cannot be
    created; it removes the segments a previous process of the same job left behind."""

    def __init__(self, config: SnapshotProcessConfig, token: str) -> None:
        if not token:
            raise ValueError(f"the snapshot token is empty: set {TOKEN_ENV} (secrets.token_hex(32))")
        self.config = config
        self.job = config.job or secrets.token_hex(4)
        self._token = token.encode()
        self._stop = threading.Event()
        if config.expected_bytes:
            check_space(config.shm_dir, config.expected_bytes)
        removed = remove_segments(config.shm_dir, self.job)
        if removed:
            log(f"removed {removed} segments left by a previous snapshot process of job {self.job}: the "
                f"snapshots it held are lost (restore from the universal checkpoint)")
        self.slots = SlotTable(config.shm_dir, self.job)
        # Before listening: a persist_dir that cannot be created fails the start, not the first persist.
        self.persister = (Persister(config.persist, token, log=log,
                                    release=lambda step: self.slots.release(PERSIST_HOLDER, step))
                          if config.persist.enabled else None)
        self._persist_feed = PersistFeed(self.persister, self.slots) if self.persister is not None else None
        host, port = parse_address(config.address)
        self._listener = socket.create_server((host, port))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self.peers = PeerCoding(config.erasure, token, self.slots) if config.erasure.enabled else None

    # ---------------------------------------------------------------- lifecycle
    def serve_forever(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(timeout=0.2):
                    continue
                try:
                    conn, peer = self._listener.accept()
                except OSError:
                    continue
                threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                 name=f"regrow-snapshot-conn-{peer[1]}").start()
        self._listener.close()
        if self.peers is not None:
            self.peers.close()
        if self.persister is not None:
            self.persister.close()  # a persist in flight reads private copies, not the segments removed next
        self._remove_all()

    def shutdown(self) -> None:
        """Stops serving; :meth:`serve_forever` then removes every segment and returns."""
        self._stop.set()

    def _remove_all(self) -> None:
        count = self.slots.remove_all()
        log(f"shut down; removed {count} segments")

    # ---------------------------------------------------------------- one connection
    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        with conn:
            conn.settimeout(self.config.handshake_timeout_s)
            try:
                hello, _ = recv_message(conn)
            except (OSError, ProtocolError) as error:
                log(f"refused connection from {peer[0]}:{peer[1]}: no valid hello ({error})")
                return
            if hello.get("op") != "hello" or not hmac.compare_digest(str(hello.get("token", "")).encode(),
                                                                     self._token):
                log(f"refused connection from {peer[0]}:{peer[1]}: wrong token")
                self._reply(conn, {"ok": False, "error": "wrong token: connection refused"})
                return
            self._reply(conn, {"ok": True, "job": self.job})
            conn.settimeout(None)  # an attached rank may stay silent for a long time between requests
            while not self._stop.is_set():
                try:
                    request, payload = recv_message(conn)
                except (OSError, ProtocolError):
                    return
                self._reply(conn, *self._handle(request, payload))

    @staticmethod
    def _reply(conn: socket.socket, message: dict, payload: bytes | bytearray | None = None) -> None:
        try:
            send_message(conn, message, payload)
        except OSError:
            pass  # the client went away; its thread ends at the next read

    def _handle(self, request: dict, payload: bytearray | None) -> tuple[dict, bytes | bytearray | None]:
        op = request.get("op")
        try:
            if op == "attach":
                restored = request.get("step")
                return self._attach(int(request["rank"]), request["tensors"], int(request["meta_capacity"]),
                                    at_step=None if restored is None else int(restored),
                                    restored_from=request.get("restored_from")), None
            if op == "latest":  # "verify": False lists the slots by their headers (the reader verifies)
                return self.slots.latest(int(request["rank"]), verify=bool(request.get("verify", True))), None
            if op == "commit":
                return self._commit(int(request["rank"]), int(request["slot"]), int(request["step"])), None
            if op == "shutdown":
                self.shutdown()
                return {"ok": True}, None
            if op == "persisted":
                status = self.persister.status() if self.persister else {"enabled": False, "persisted": [],
                                                                         "results": []}
                return {"ok": True, **status}, None
            if op == "run_config":
                return self._run_config(request["config"]), None
            if isinstance(op, str) and op.startswith("ec_"):
                if self.peers is None:
                    return {"ok": False, "error": f"{op}: erasure coding is off in this snapshot process "
                                                  f"(start it with ec_group_size > 0)"}, None
                return self.peers.handle(op, request, payload)
            return {"ok": False, "error": f"unknown op {op!r} (attach, latest, commit, shutdown, persisted, "
                                          f"run_config, ec_*)"}, None
        except (KeyError, TypeError, ValueError, OSError, ShmSpaceError, ErasureError, ProtocolError,
                TimeoutError) as error:
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}, None

    # ---------------------------------------------------------------- what ATTACH and COMMIT mean for each part
    def _attach(self, rank: int, table: list[dict], meta_capacity: int, *, at_step: int | None = None,
                restored_from: str | None = None) -> dict:
        """ATTACH (:meth:`SlotTable.attach`). A re-attach at ``at_step`` (a restore) also rolls the erasure coding
        and the persistence back to that step: the steps after it are re-run."""
        reply = self.slots.attach(rank, table, meta_capacity, at_step=at_step, restored_from=restored_from)
        if reply["reused"] and at_step is not None:
            if self.peers is not None:
                self.peers.rolled_back(at_step)  # outside the slots' lock: the coding thread takes its own, then that
            if self._persist_feed is not None:
                self._persist_feed.rolled_back(at_step)
        return reply

    def _commit(self, rank: int, slot: int, step: int) -> dict:
        """COMMIT (:meth:`SlotTable.commit`): a persist step's slots are held from its first COMMIT, the group's
        coding learns the newest step all local ranks have, and a step all have committed goes to the persister."""
        refused = self.slots.commit(rank, slot, step)
        if refused is not None:
            return {"ok": False, "error": refused}
        if self._persist_feed is not None:
            self._persist_feed.hold_at_first_commit(step)
        held = self.slots.held_slots(rank)
        if self.peers is not None:
            ready = self.slots.ready_step()
            if ready is not None:
                self.peers.local_ready(ready)
        if self._persist_feed is not None:
            self._persist_feed.offer(step)
        # The sink must not overwrite a held slot; it learns of holds here, before it can write that slot again.
        return {"ok": True, "held": held}

    def _run_config(self, config: dict) -> dict:
        """Sets the run's config (``TrainerConfig.to_dict()``) that persisted manifests record."""
        if not isinstance(config, dict):
            raise TypeError(f"run_config: config must be a JSON object, not {type(config).__name__}")
        if self.persister is None:
            return {"ok": False, "error": "run_config: persistence is off in this snapshot process (start it with "
                                          "persist_every > 0)"}
        self.persister.set_run_config(config)
        return {"ok": True}

    # ---------------------------------------------------------------- slot holds, as the slots grant them
    def hold(self, holder: str, step: int) -> str:
        """:meth:`SlotTable.hold`."""
        return self.slots.hold(holder, step)

    def holds_ready(self, holder: str, step: int) -> bool:
        """:meth:`SlotTable.holds_ready`."""
        return self.slots.holds_ready(holder, step)

    def release(self, holder: str, step: int) -> None:
        """:meth:`SlotTable.release`."""
        self.slots.release(holder, step)

    def _ready_step(self) -> int | None:
        """:meth:`SlotTable.ready_step`."""
        return self.slots.ready_step()
