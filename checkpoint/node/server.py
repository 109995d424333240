"""The snapshot process's server: it owns the process's parts and answers the protocol (docs/snapshot-protocol.md);
its connections, their caps and the token check are ``connections.py``'s, one thread per connection.

The requests are checked by ``requests.validate`` (one table of every op's fields) and handed to the process's
parts: the segment slots (``slots.py``), the erasure coding with the group's peers (``peers.py``, when
``erasure.ec_group_size`` > 0) and the persistence of snapshots as universal checkpoints (``persister.py``, when
``persist.persist_every`` > 0). The server only decides what a COMMIT or an ATTACH means for each of them, and
caps what a peer may announce or send from the size of this node's own segments (``limits.py``).
"""

from __future__ import annotations

import secrets
import socket
import threading
import traceback
from collections.abc import Callable

from regrow.checkpoint.node.connections import Connections
from regrow.checkpoint.node.erasure import ErasureError
from regrow.checkpoint.node.job_lock import JobLock
from regrow.checkpoint.node.limits import PEER_BUFFER_FACTOR, PEER_BUFFER_FLOOR, peer_buffer_limit, piece_limit
from regrow.checkpoint.node.log import log
from regrow.checkpoint.node.peers import PeerCoding
from regrow.checkpoint.node.persist import PERSIST_HOLDER
from regrow.checkpoint.node.persister import Persister, PersistFeed
from regrow.checkpoint.node.process import SnapshotProcessConfig
from regrow.checkpoint.node.requests import RequestError, validate
from regrow.checkpoint.node.shm import ShmSpaceError, check_space, remove_segments
from regrow.checkpoint.node.slots import SlotTable
from regrow.checkpoint.snapshot.protocol import FrameRefused, ProtocolError, check_token, parse_address

REBUILD_WAIT_S = 300.0
"""How long a rank's request waits for the rebuild of a replacement started with ``await_rebuild``."""
RANK_OPS = ("attach", "latest", "commit", "persisted", "run_config")
"""The ranks' requests (the others are the group's and the launcher's): those a pending rebuild holds back."""

EXPECTED_ERRORS = (RequestError, KeyError, TypeError, ValueError, OSError, ShmSpaceError, ErasureError,
                   ProtocolError, TimeoutError)
"""What a request may fail with in the normal course (a bad value, a refused step, a full /dev/shm, a peer that
did not answer): answered ``ok: false`` with the error. Anything else is a bug: answered too, and logged with its
traceback."""


class SnapshotServer:
    """Owns the segments and answers the protocol. Use :meth:`serve_forever` (returns after SHUTDOWN or
    :meth:`shutdown`).

    Construction fails (before listening, and before touching any segment) when another snapshot process of the
    same job runs on this node (``job_lock.JobRunning``, naming it), the token is unusable, ``shm_dir`` lacks
    ``expected_bytes``, or ``persist_dir`` cannot be created; it removes the segments a previous process of the
    same job left behind, and holds the job's lock until :meth:`serve_forever` returns."""

    def __init__(self, config: SnapshotProcessConfig, token: str, *,
                 round_hook: Callable[[int], None] | None = None) -> None:
        """``round_hook``: the erasure-coding rounds' (``PeerCoding``), for fault injection."""
        check_token(token)
        self.config = config
        self.job = config.job or secrets.token_hex(4)
        self._stop = threading.Event()
        self._job_lock = JobLock.acquire(config.shm_dir, self.job)
        try:
            self._start(config, token, round_hook)
        except BaseException:
            self._job_lock.release()
            raise

    def _start(self, config: SnapshotProcessConfig, token: str, round_hook: Callable[[int], None] | None) -> None:
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
        self.peers = (PeerCoding(config.erasure, token, self.slots, round_hook=round_hook)
                      if config.erasure.enabled else None)
        self._rebuilt = threading.Event()
        if not config.await_rebuild:
            self._rebuilt.set()
        self._connections = Connections(self._listener, limits=config.limits, token=token, handler=self,
                                        stop=self._stop)

    # ---------------------------------------------------------------- lifecycle
    def serve_forever(self) -> None:
        self._connections.serve()
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
        """Removes every segment, then releases the job's lock (the job may start again on this node)."""
        count = self.slots.remove_all()
        self._job_lock.release()
        log(f"shut down; removed {count} segments")

    # ---------------------------------------------------------------- one request
    def handle(self, request: dict, payload: bytearray | None) -> tuple[dict, bytes | bytearray | None]:
        """The reply to one authenticated request (``connections.Handler``); never raises: a failure is answered
        ``ok: false`` naming it, and logged."""
        op = request.get("op")
        try:
            reply, raw = self._dispatch(validate(request), payload)
        except EXPECTED_ERRORS as error:
            reply, raw = {"ok": False, "error": f"{type(error).__name__}: {error}"}, None
        except Exception as error:  # noqa: BLE001 (a bug: answered and logged whole; the connection serves on)
            log(f"internal error in {str(op)[:40]!r}: {type(error).__name__}: {error}\n{traceback.format_exc()}")
            return {"ok": False, "error": f"internal error in {str(op)[:40]!r}: {type(error).__name__}: "
                                          f"{str(error)[:1000]} (the snapshot process logged it)"}, None
        if not reply.get("ok"):
            log(f"refused {str(op)[:40]!r}: {reply.get('error')}")
        return reply, raw

    def check_raw(self, message: dict, size: int) -> None:
        """Refuses (``FrameRefused``) a raw payload on any op but ``ec_piece`` with erasure coding on, and one
        larger than a data piece of the largest node buffer a peer may announce (``limits.piece_limit``)."""
        op = message.get("op")
        if op != "ec_piece" or self.peers is None:
            raise FrameRefused(f"{str(op)[:40]!r} carries no raw payload (only ec_piece does, with erasure coding "
                               f"on), yet {size} bytes were announced")
        node_bytes = self.slots.node_bytes()
        k = self.config.erasure.ec_group_size - self.config.erasure.ec_parity
        if size > (limit := piece_limit(node_bytes, k)):
            raise FrameRefused(f"ec_piece of {size} bytes exceeds the {limit} bytes a data piece may have here: "
                               f"{_buffer_rule(node_bytes)}")

    def _dispatch(self, request: dict, payload: bytearray | None) -> tuple[dict, bytes | bytearray | None]:
        op = request["op"]
        if op in RANK_OPS and not self._rebuilt.wait(REBUILD_WAIT_S):
            raise RequestError(f"{op}: this replacement snapshot process is still waiting for its rebuild from its "
                               f"group after {REBUILD_WAIT_S} s (the launcher sends ec_rebuild once the group is "
                               f"announced)")
        if op == "attach":
            return self._attach(request["rank"], request["tensors"], request["meta_capacity"],
                                at_step=request.get("step"), restored_from=request.get("restored_from")), None
        if op == "latest":  # "verify": False lists the slots by their headers (the reader verifies)
            return self.slots.latest(request["rank"], verify=request.get("verify", True)), None
        if op == "commit":
            return self._commit(request["rank"], request["slot"], request["step"]), None
        if op == "shutdown":
            self.shutdown()
            return {"ok": True}, None
        if op == "persisted":
            status = self.persister.status() if self.persister else {"enabled": False, "persisted": [],
                                                                     "results": []}
            return {"ok": True, **status}, None
        if op == "run_config":
            return self._run_config(request["config"]), None
        if op == "hello":
            raise RequestError("hello: this connection has already presented the token")
        if self.peers is None and op == "ec_status":  # every restore asks; "off" is an answer, not a refusal
            return {"ok": True, "enabled": False, "complete": []}, None
        if self.peers is None:
            return {"ok": False, "error": f"{op}: erasure coding is off in this snapshot process (start it with "
                                          f"ec_group_size > 0)"}, None
        if op == "ec_size" and request["size"] > (limit := peer_buffer_limit(self.slots.node_bytes())):
            raise RequestError(f"ec_size: a node buffer of {request['size']} bytes exceeds the {limit} bytes "
                               f"accepted here: {_buffer_rule(self.slots.node_bytes())}")
        if op == "ec_rebuild":
            try:
                return self.peers.handle(op, request, payload)
            finally:
                self._rebuilt.set()  # rebuilt or not (then the ranks fall back further): they wait no longer
        return self.peers.handle(op, request, payload)

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


def _buffer_rule(node_bytes: int) -> str:
    """Why a peer's buffer or piece is capped where it is (the fix: a group whose nodes run the same ranks)."""
    return (f"a peer's node buffer may be at most {PEER_BUFFER_FACTOR} x this node's {node_bytes} bytes of segments, "
            f"and at least {PEER_BUFFER_FLOOR} bytes (the nodes of a group must run the same number of ranks of "
            f"one model)")
