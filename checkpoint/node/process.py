"""The per-node snapshot process: it owns the shared memory that holds every local rank's latest shard snapshots.

One process per node, started by the launcher (:func:`start_snapshot_process`, or ``python -m
regrow.checkpoint.node.process --address 127.0.0.1:0``), outlives the ranks: a rank that crashes and restarts finds its
snapshots where it left them. For each rank that ATTACHes it creates two segments under ``shm_dir`` (mode 0600,
alternating: one always holds a complete snapshot while the other is being written), sized from the tensor table
the rank announces; ranks map the files themselves (``snapshot_segment.open_segment``) and write into them, so no
snapshot byte ever crosses the socket between ranks and this process. The protocol is in ``snapshot_protocol.py``
and docs/snapshot-protocol.md. With erasure coding on (``erasure.ec_group_size``), this process also encodes its
ranks' committed snapshots with its group's peers and can rebuild a lost node's segments (``snapshot_peers.py``).
With persistence on (``persist.persist_every``), it writes its ranks' parts of a universal checkpoint every
``persist_every`` steps from their sealed snapshots (``persist.py``), so the ranks need no checkpoint writer.

Space is checked before anything is created (``os.statvfs``) and reserved with ``posix_fallocate``, so a
``/dev/shm`` that is too small fails at start-up (``expected_bytes``) or at ATTACH, never in the middle of a run.
If this process is killed, the segments it created are orphaned and the next snapshot process of the same job
removes them: the snapshots are lost with it, and ranks restore from the universal checkpoint instead.

This module does not import torch (start-up stays fast; persistence, when on, imports it at start-up); the rank
side is ``snapshot_sink.py``.
"""

from __future__ import annotations

import argparse
import hmac
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from regrow.checkpoint.node.coded_buffer import BufferError, RebuiltSegment, SealedSegment
from regrow.checkpoint.node.erasure import ErasureCodingConfig, ErasureError
from regrow.checkpoint.node.peers import PeerCoding
from regrow.checkpoint.node.persist import PERSIST_HOLDER, PersistConfig
from regrow.checkpoint.node.persister import Persister
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, ProtocolError, parse_address, recv_message, send_message

SLOTS = 2


def log(text: str, *, rank: int | None = None, step: int | None = None) -> None:
    """``[rank r, step s] snapshot process: ...`` for a rank's events, ``[snapshot process] ...`` otherwise."""
    prefix = f"[rank {rank}, step {step if step is not None else '-'}]" if rank is not None else "[snapshot process]"
    print(f"{prefix} snapshot process: {text}" if rank is not None else f"{prefix} {text}", flush=True)


class ShmSpaceError(RuntimeError):
    """The shared-memory filesystem cannot hold the requested snapshots."""


@dataclass(kw_only=True)
class SnapshotProcessConfig:
    """Settings of the snapshot process. Validated on construction; errors name the field."""

    address: str = "127.0.0.1:0"
    """host:port to listen on (port 0: any free port; the chosen address is printed as ``READY host:port``)."""
    job: str = ""
    """Names this job's segments (``regrow-snap-<job>-r<rank>-s<slot>``); empty: a random id. A restarted process
    of the same job removes the segments a crashed one left behind."""
    shm_dir: str = "/dev/shm"
    """Directory of the segments: a tmpfs (RAM), so the snapshots survive the ranks but not the node."""
    expected_bytes: int = 0
    """Segment bytes the job will need on this node (2 x each local rank's snapshot); checked against the free
    space at start-up so a too-small /dev/shm fails now, not at the first snapshot. 0: checked at ATTACH only."""
    handshake_timeout_s: float = 10.0
    """Seconds a new connection has to present the token (a silent client cannot hold a thread longer)."""
    erasure: ErasureCodingConfig = field(default_factory=ErasureCodingConfig)
    """Erasure coding with the peer snapshot processes of this node's group (off by default)."""
    persist: PersistConfig = field(default_factory=PersistConfig)
    """Persisting the ranks' snapshots as universal checkpoints every ``persist_every`` steps (off by default)."""

    def __post_init__(self) -> None:
        parse_address(self.address)
        if not isinstance(self.expected_bytes, int) or self.expected_bytes < 0:
            raise ValueError(f"SnapshotProcessConfig.expected_bytes={self.expected_bytes!r} must be an int >= 0")
        if not self.handshake_timeout_s > 0:
            raise ValueError(f"SnapshotProcessConfig.handshake_timeout_s={self.handshake_timeout_s!r} must be > 0")
        if not Path(self.shm_dir).is_dir():
            raise ValueError(f"SnapshotProcessConfig.shm_dir={self.shm_dir!r} is not a directory")
        if self.job and not self.job.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"SnapshotProcessConfig.job={self.job!r} may hold only letters, digits, '-' and '_'")


def check_space(shm_dir: str, needed: int) -> None:
    """Raises :class:`ShmSpaceError` unless ``shm_dir`` has ``needed`` bytes free."""
    stat = os.statvfs(shm_dir)
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        raise ShmSpaceError(
            f"{shm_dir} has {free / 2**30:.2f} GiB free but the snapshots need {needed / 2**30:.2f} GiB "
            f"(2 buffers per local rank): enlarge it (e.g. `mount -o remount,size=<N>G {shm_dir}`, or docker "
            f"--shm-size), snapshot fewer ranks per node, or turn in-memory snapshots off")


@dataclass
class _RankSegments:
    paths: list[str]
    table: list[dict]
    meta_capacity: int
    size: int
    committed: dict[int, int] = field(default_factory=dict)  # slot -> step of the last COMMIT
    tensors: list[dict] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)  # holder -> slot its sink must not overwrite

    def newest(self) -> int | None:
        """The newest committed step, if any."""
        return max(self.committed.values(), default=None)

    def slot_of(self, step: int) -> int | None:
        return next((slot for slot, committed in self.committed.items() if committed == step), None)


class SnapshotServer:
    """Owns the segments and answers the protocol; one thread per authenticated connection, so a slow or silent
    client never blocks another. Use :meth:`serve_forever` (returns after SHUTDOWN or :meth:`shutdown`)."""

    def __init__(self, config: SnapshotProcessConfig, token: str) -> None:
        if not token:
            raise ValueError(f"the snapshot token is empty: set {TOKEN_ENV} (secrets.token_hex(32))")
        self.config = config
        self.job = config.job or secrets.token_hex(4)
        self._token = token.encode()
        self._ranks: dict[int, _RankSegments] = {}
        self._pending_holds: dict[str, int] = {}  # holder -> step whose slots are held as ranks COMMIT it
        self._persist_hold_step: int | None = None  # the persist step whose slots were last held for the persister
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if config.expected_bytes:
            check_space(config.shm_dir, config.expected_bytes)
        self._remove_leftovers()
        # Before listening: a persist_dir that cannot be created fails the start, not the first persist.
        self.persister = (Persister(config.persist, token, log=log,
                                    release=lambda step: self.release(PERSIST_HOLDER, step))
                          if config.persist.enabled else None)
        host, port = parse_address(config.address)
        self._listener = socket.create_server((host, port))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self.peers = PeerCoding(config.erasure, token, self) if config.erasure.enabled else None

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

    def _segment_path(self, rank: int, slot: int) -> str:
        return str(Path(self.config.shm_dir) / f"regrow-snap-{self.job}-r{rank}-s{slot}")

    def _remove_leftovers(self) -> None:
        removed = remove_segments(self.config.shm_dir, self.job)
        if removed:
            log(f"removed {removed} segments left by a previous snapshot process of job {self.job}: the "
                f"snapshots it held are lost (restore from the universal checkpoint)")

    def _remove_all(self) -> None:
        with self._lock:
            for segments in self._ranks.values():
                for path in segments.paths:
                    Path(path).unlink(missing_ok=True)
            count = sum(len(s.paths) for s in self._ranks.values())
            self._ranks.clear()
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
                return self._latest(int(request["rank"]), verify=bool(request.get("verify", True))), None
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

    # ---------------------------------------------------------------- the operations
    def _attach(self, rank: int, table: list[dict], meta_capacity: int, *, at_step: int | None = None,
                restored_from: str | None = None) -> dict:
        """ATTACH; ``at_step``/``restored_from``: the rank's state is at that step, restored from that segment (if
        from one), so its slots of later steps, or of that step but another history, are abandoned (see
        :meth:`_abandon_locked`)."""
        _, payload = seg.plan_tensors(table)
        size = seg.segment_bytes(meta_capacity, payload)
        with self._lock:
            have = self._ranks.get(rank)
            if have is None:
                check_space(self.config.shm_dir, SLOTS * size)
                paths = [self._create(rank, slot, size, meta_capacity) for slot in range(SLOTS)]
                self._ranks[rank] = _RankSegments(paths=paths, table=table, meta_capacity=meta_capacity, size=size,
                                                  tensors=table)
            else:
                # Only the tensor table must match. The metadata room asked for grows by a few bytes with the step
                # and data cursor, far less than the room's headroom: the segments keep their room, and the sink's
                # begin() refuses metadata that would not fit.
                if have.table != table:
                    raise ValueError(f"rank {rank} re-attached with another tensor table; its snapshots were "
                                     f"taken at another layout (restore from the universal checkpoint)")
                if at_step is not None:
                    self._abandon_locked(have, at_step, restored_from)
                    if self._persist_hold_step is not None and self._persist_hold_step > at_step:
                        self._persist_hold_step = None  # the re-run step's slots are held again
                reply = {"ok": True, "paths": have.paths, "reused": True, "segment_bytes": have.size,
                         "held": sorted(set(have.held.values()))}
        if have is not None:
            log("re-attached to its existing segments", rank=rank)
            if at_step is not None and self.peers is not None:
                self.peers.rolled_back(at_step)  # outside our lock: the coding thread takes its own, then ours
            if at_step is not None and self.persister is not None:
                self.persister.rolled_back(at_step)
            return reply
        log(f"attached: {SLOTS} segments of {size / 2**20:.1f} MiB", rank=rank)
        return {"ok": True, "paths": paths, "reused": False, "segment_bytes": size, "held": []}

    def _abandon_locked(self, have: _RankSegments, at_step: int, restored_from: str | None) -> None:
        """Forgets the commits of ``have``'s slots that the rank abandoned by going back to ``at_step``: those of
        later steps, and of ``at_step`` itself unless restored from that very slot (the sink's own rule for which
        slot it keeps). They stay sealed, but of a history the job left: counted as committed, they made an
        encode round or a persist take a step from that history next to other ranks' re-run one (the same bytes
        only when training is deterministic), and made holds of the re-run steps fail as "past". A holder that
        held such a slot now waits for the rank's new COMMIT of its step (a round waiting on it goes on then)."""
        for slot, step in list(have.committed.items()):
            if step < at_step or (step == at_step and have.paths[slot] == restored_from):
                continue
            del have.committed[slot]
            for holder, held_slot in list(have.held.items()):
                if held_slot == slot:
                    del have.held[holder]
                    self._pending_holds[holder] = step

    def _create(self, rank: int, slot: int, size: int, meta_capacity: int) -> str:
        path = self._segment_path(rank, slot)
        # 0600: the snapshots are the job's training state; only the job's user may map them.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # independent of the umask
            try:
                # Reserves the pages now: a full tmpfs fails here with ENOSPC instead of SIGBUS in a rank later.
                os.posix_fallocate(fd, 0, size)
            except OSError as error:
                os.unlink(path)
                raise ShmSpaceError(f"cannot reserve {size} bytes in {self.config.shm_dir}: {error}") from error
        finally:
            os.close(fd)
        buffer = seg.open_segment(path, writable=True)
        try:
            seg.format_empty(buffer, rank=rank, slot=slot, meta_capacity=meta_capacity)
        finally:
            buffer.close()
        return path

    def _latest(self, rank: int, *, verify: bool = True) -> dict:
        with self._lock:
            have = self._ranks.get(rank)
        if have is None:
            return {"ok": True, "latest": None, "slots": [], "note": f"rank {rank} never attached"}
        slots = [seg.inspect(path, rank=rank, payload=verify) for path in have.paths]
        good = [s for s in slots if s["status"] == "ok"]
        latest = max(good, key=lambda s: s["step"]) if good else None
        return {"ok": True, "latest": latest, "slots": slots}

    def _commit(self, rank: int, slot: int, step: int) -> dict:
        with self._lock:
            have = self._ranks.get(rank)
        if have is None or not 0 <= slot < SLOTS:
            return {"ok": False, "error": f"rank {rank} has no slot {slot} (ATTACH first)"}
        buffer = seg.open_segment(have.paths[slot], writable=False)
        try:
            header = seg.read_header(buffer)
        finally:
            buffer.close()
        if header.complete != seg.COMPLETE or header.step != step:
            return {"ok": False, "error": f"slot {slot} holds no sealed snapshot of step {step}"}
        with self._lock:
            have.committed[slot] = step
            for holder, wanted in self._pending_holds.items():
                if wanted == step:
                    have.held[holder] = slot
        self._hold_for_persist(step)
        with self._lock:
            held = sorted(set(have.held.values()))
        if self.peers is not None:
            ready = self._ready_step()
            if ready is not None:
                self.peers.local_ready(ready)
        self._offer_persist(step)
        # The sink must not overwrite a held slot; it learns of holds here, before it can write that slot again.
        return {"ok": True, "held": held}

    # ---------------------------------------------------------------- slot holds (NodeSegments)
    def hold(self, holder: str, step: int) -> str:
        """See ``snapshot_ec_buffer.NodeSegments.hold``. Safe because a sink never writes its newest committed
        slot's step again before its next COMMIT, and that COMMIT's reply carries the hold."""
        with self._lock:
            self._release_locked(holder)
            if any(have.newest() is not None and have.newest() > step for have in self._ranks.values()):
                return "past"
            for have in self._ranks.values():
                if have.newest() == step:
                    have.held[holder] = have.slot_of(step)
            if self._ranks and all(holder in have.held for have in self._ranks.values()):
                return "held"
            self._pending_holds[holder] = step
            return "pending"

    def holds_ready(self, holder: str, step: int) -> bool:
        with self._lock:
            return bool(self._ranks) and all(
                holder in have.held and have.committed.get(have.held[holder]) == step for have in self._ranks.values())

    def release(self, holder: str, step: int) -> None:
        with self._lock:
            held_steps = {have.committed.get(have.held[holder]) for have in self._ranks.values() if holder in have.held}
            if self._pending_holds.get(holder, step) == step and held_steps <= {step}:
                self._release_locked(holder)

    def _release_locked(self, holder: str) -> None:
        self._pending_holds.pop(holder, None)
        for have in self._ranks.values():
            have.held.pop(holder, None)

    # ---------------------------------------------------------------- persistence (snapshot_persist)
    def _persist_step(self, step: int) -> bool:
        return self.persister is not None and self.persister.eligible(step)

    def _hold_for_persist(self, step: int) -> None:
        """At the first COMMIT of a persist step, holds every rank's slot of it until the persister has copied it
        (the ranks that COMMIT it later are held at their COMMIT, whose reply tells their sink). Holding only once
        all ranks had committed lost the step whenever one rank's COMMIT came a step late (a loaded machine): by
        then another rank was past it and its slot could not be held any more. Not while a persist runs: its
        offer would be skipped, and taking the holder's holds would drop the ones its copy may still need."""
        if not self._persist_step(step) or not self.persister.idle:
            return
        with self._lock:  # the ranks' COMMITs arrive on their own threads: one of them takes the hold
            if step == self._persist_hold_step:
                return
            self._persist_hold_step = step
        self.hold(PERSIST_HOLDER, step)

    def _offer_persist(self, step: int) -> None:
        """Hands ``step`` to the persister when it is a persist step and every attached rank has committed it.
        Offered even if a slot could not be held (a rank was already past the step at its first COMMIT): the
        persister's copy is checked seqlock style (``slot_copy.copy_sealed``), so a slot rewritten under
        it abandons the step and nothing torn is written."""
        if not self._persist_step(step):
            return
        slots = {}
        with self._lock:
            for rank, have in self._ranks.items():
                found = [slot for slot, committed in have.committed.items() if committed == step]
                if not found:
                    return  # this rank's COMMIT of the step comes later (and offers it then)
                slots[rank] = have.paths[found[0]]
        self.persister.offer(step, slots)

    def _run_config(self, config: dict) -> dict:
        """Sets the run's config (``TrainerConfig.to_dict()``) that persisted manifests record."""
        if not isinstance(config, dict):
            raise TypeError(f"run_config: config must be a JSON object, not {type(config).__name__}")
        if self.persister is None:
            return {"ok": False, "error": "run_config: persistence is off in this snapshot process (start it with "
                                          "persist_every > 0)"}
        self.persister.run_config = config
        return {"ok": True}

    # ---------------------------------------------------------------- for erasure coding (snapshot_peers)
    def _ready_step(self) -> int | None:
        """The newest step every attached rank has committed (what the group encodes next), if any."""
        with self._lock:
            common: set[int] | None = None
            for have in self._ranks.values():
                steps = set(have.committed.values())
                common = steps if common is None else common & steps
        return max(common) if common else None

    def sealed_segments(self, step: int) -> list[SealedSegment]:
        """Each attached rank's slot committed at ``step`` (KeyError naming the rank if one has none)."""
        with self._lock:
            out = []
            for rank, have in sorted(self._ranks.items()):
                slots = [slot for slot, committed in have.committed.items() if committed == step]
                if not slots:
                    raise KeyError(f"rank {rank} has no committed snapshot of step {step}")
                out.append(SealedSegment(rank=rank, slot=slots[0], tensors=have.tensors,
                                         meta_capacity=have.meta_capacity, path=have.paths[slots[0]]))
        return out

    def install(self, segment: RebuiltSegment, step: int, *, replace: bool = False) -> None:
        """Creates ``segment.rank``'s two segments as ATTACH would and writes the rebuilt snapshot into its slot,
        committed; the rank's later ATTACH with the same table re-attaches to it. With ``replace`` (a rollback of
        an attached rank), the rank's existing slot is overwritten instead; its tensor table must match."""
        _, payload = seg.plan_tensors(segment.tensors)
        size = seg.segment_bytes(segment.meta_capacity, payload)
        if len(segment.data) > size:
            raise BufferError(f"rebuilt segment of rank {segment.rank} has {len(segment.data)} bytes, more than "
                              f"the {size} its table needs")
        with self._lock:
            have = self._ranks.get(segment.rank)
            if have is not None and replace:
                if have.table != segment.tensors or have.meta_capacity != segment.meta_capacity:
                    raise ValueError(f"rank {segment.rank} is attached with another tensor table or metadata room "
                                     f"than its coded buffer of step {step}: cannot roll it back")
                have.committed.pop(segment.slot, None)  # void while it is rewritten
                buffer = seg.open_segment(have.paths[segment.slot], writable=True)
                try:
                    buffer[: len(segment.data)] = segment.data
                finally:
                    buffer.close()
                have.committed[segment.slot] = step
                return
            if have is not None:
                raise ValueError(f"rank {segment.rank} is already attached here: rebuild only into a fresh process")
            check_space(self.config.shm_dir, SLOTS * size)
            paths = [self._create(segment.rank, slot, size, segment.meta_capacity) for slot in range(SLOTS)]
            buffer = seg.open_segment(paths[segment.slot], writable=True)
            try:
                buffer[: len(segment.data)] = segment.data
            finally:
                buffer.close()
            self._ranks[segment.rank] = _RankSegments(paths=paths, table=segment.tensors,
                                                      meta_capacity=segment.meta_capacity, size=size,
                                                      committed={segment.slot: step}, tensors=segment.tensors)
        log(f"rebuilt from peers into slot {segment.slot}", rank=segment.rank, step=step)


def remove_segments(shm_dir: str, job: str) -> int:
    """Removes every segment of snapshot process job ``job`` under ``shm_dir``; returns how many there were."""
    found = sorted(Path(shm_dir).glob(f"regrow-snap-{job}-r*-s*"))
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


# -------------------------------------------------------------------- starting it
@dataclass
class SnapshotProcess:
    """A snapshot process started by :func:`start_snapshot_process`."""

    address: str
    job: str
    process: subprocess.Popen
    shm_dir: str = "/dev/shm"
    stop_timeout_s: float = 10.0
    """How long :meth:`stop` waits by default: longer when it persists (its last persists finish first)."""

    def stop(self, timeout_s: float | None = None) -> int:
        """Asks it to shut down (SIGTERM: it removes its segments once its persists are done), kills it after
        ``timeout_s`` (default ``stop_timeout_s``); returns its exit code. A process that did not shut down
        cleanly (killed, crashed, or killed here) could not remove its segments: they are removed here, so a failed
        job leaves no /dev/shm behind (nothing could use them: a replacement of the same job would remove them as
        leftovers)."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.returncode != 0:
            removed = remove_segments(self.shm_dir, self.job)
            if removed:
                log(f"removed {removed} segments of job {self.job}, whose snapshot process ended with exit code "
                    f"{self.process.returncode}")
        return self.process.returncode


def start_snapshot_process(config: SnapshotProcessConfig, *, token: str, timeout_s: float = 30.0) -> SnapshotProcess:
    """Starts ``python -m regrow.checkpoint.node`` with ``config`` and the job's ``token`` (passed in the
    environment, never on the command line where ``ps`` shows it); returns once it listens. Raises RuntimeError
    with its output if it fails to start (e.g. /dev/shm too small for ``expected_bytes``)."""
    job = config.job or secrets.token_hex(4)
    command = [sys.executable, "-m", "regrow.checkpoint.node", "--address", config.address, "--job", job,
               "--shm-dir", config.shm_dir, "--expected-bytes", str(config.expected_bytes),
               "--ec-group-size", str(config.erasure.ec_group_size), "--ec-parity", str(config.erasure.ec_parity),
               "--ec-timeout-s", str(config.erasure.peer_timeout_s),
               "--persist-every", str(config.persist.persist_every), "--persist-dir", config.persist.persist_dir,
               "--keep-last", str(config.persist.keep_last),
               "--persist-timeout-s", str(config.persist.commit_timeout_s),
               "--persist-copy-threads", str(config.persist.copy_threads)]
    env = dict(os.environ, **{TOKEN_ENV: token})
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        print(line, end="", flush=True)  # its start-up log (e.g. leftovers removed) belongs in the launcher's
        if line.startswith("READY "):
            _forward_output(process)
            # A persist in flight and the run's queued last step may each take up to commit_timeout_s.
            stop_timeout_s = 10.0 + (2 * config.persist.commit_timeout_s if config.persist.enabled else 0.0)
            return SnapshotProcess(address=line.split()[1], job=job, process=process, shm_dir=config.shm_dir,
                                   stop_timeout_s=stop_timeout_s)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"the snapshot process did not start (exit code {process.returncode}):\n{''.join(lines)}")


def _forward_output(process: subprocess.Popen) -> None:
    """Copies the process's later log lines to this process's stdout (a thread), so its pipe never fills."""

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)

    threading.Thread(target=pump, daemon=True, name="regrow-snapshot-log").start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regrow.checkpoint.node",
                                     description=f"The node's snapshot process; the token comes from {TOKEN_ENV}.")
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--job", default="")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--expected-bytes", type=int, default=0)
    parser.add_argument("--ec-group-size", type=int, default=0, help="nodes per erasure-coding group; 0: off")
    parser.add_argument("--ec-parity", type=int, default=1, help="nodes of a group that may be lost at once")
    parser.add_argument("--ec-timeout-s", type=float, default=30.0, help="limit of each call to a peer")
    parser.add_argument("--persist-every", type=int, default=0,
                        help="persist every step that is a multiple of this as a universal checkpoint; 0: off")
    parser.add_argument("--persist-dir", default="", help="checkpoint root every node's snapshot process sees")
    parser.add_argument("--keep-last", type=int, default=2, help="persisted checkpoints to keep (>= 2)")
    parser.add_argument("--persist-timeout-s", type=float, default=600.0,
                        help="how long the process holding rank 0 waits for every rank's part")
    parser.add_argument("--persist-copy-threads", type=int, default=4, help="threads copying a slot before a persist")
    args = parser.parse_args(argv)
    try:
        erasure = ErasureCodingConfig(ec_group_size=args.ec_group_size, ec_parity=args.ec_parity,
                                      peer_timeout_s=args.ec_timeout_s)
        persist = PersistConfig(persist_every=args.persist_every, persist_dir=args.persist_dir,
                                keep_last=args.keep_last, commit_timeout_s=args.persist_timeout_s,
                                copy_threads=args.persist_copy_threads)
        config = SnapshotProcessConfig(address=args.address, job=args.job, shm_dir=args.shm_dir,
                                       expected_bytes=args.expected_bytes, erasure=erasure, persist=persist)
        server = SnapshotServer(config, os.environ.get(TOKEN_ENV, ""))
    except (ValueError, TypeError, ShmSpaceError, OSError) as error:
        print(f"[snapshot process] cannot start: {error}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    signal.signal(signal.SIGINT, lambda *_: server.shutdown())  # Ctrl-C: remove the segments too
    print(f"READY {server.address} job {server.job} pid {os.getpid()}", flush=True)
    server.serve_forever()
    return 0

