"""Erasure coding between the snapshot processes of a group, and the rebuild of a lost node from its peers.

Each snapshot process is node ``i`` of a group of n (``ec_group_size``) tolerating p losses (``ec_parity``); the
placement is :class:`regrow.checkpoint.node.erasure.RotatingParity`'s rotating parity. A node's buffer is its local ranks'
sealed segments of one step (``snapshot_ec_buffer``). Steps are agreed without a coordinator, and a round of step
s completes on a node once every member has announced s. An idle process starts a round of the newest step a peer
has announced that all its local ranks have committed too (joining that peer's round), or else of its own newest
such step. A running round is abandoned for a newer step only when a peer announced that newer step and this node
has it too: rounds converge on the highest announced step, and a newer local snapshot alone never stops a round.
(An earlier version let every newer local snapshot supersede the running round; with a snapshot every step and a
round longer than a step, no round ever completed.) One round:

1. pack the buffer (one copy of the slots, checked not to have been overwritten meanwhile); send ``ec_size``
   (step, node, bytes) to every peer;
2. once all n sizes of s are in, cut the buffer into k = n - p pieces (``GroupCode.geometry``) and send piece j to
   the p parity holders of its stripe (``ec_piece`` with the bytes as raw payload);
3. once the k data pieces of each of its p stripes are in, compute their parity (``GroupCode.encode_stripe``) and
   keep buffer and parity as "complete" for s (the newest two complete steps are kept, so a round that dies half
   way leaves the previous step complete on every node).

Snapshots that arrive while a round runs are not queued: when it ends, the newest is taken. A round whose peer
stopped answering times out (``peer_timeout_s``), or ends at once when ``ec_group`` replaces that peer or the local
ranks go back to an earlier step (:meth:`PeerCoding.rolled_back`), and the next round starts from the newest step.
Every round has an id the leader gives it, carried by all its messages. Everything runs on the process's coding
thread, off the training path (ranks only COMMIT).

Rebuild (``ec_rebuild``, sent to a replacement process with empty memory): ask every peer (``ec_status``) which
steps it holds complete, take the newest step s held by at least n - p nodes, fetch those nodes' buffers and parity
(``ec_fetch``), decode, and install this node's ranks' segments, sealed and committed, so ``restore_from_node``
restores them unchanged; the node also recomputes its own parity pieces of s and keeps s complete, so the group
tolerates p losses again at once, not only after its next round. Fewer than n - p holders: :class:`NotRecoverable`
naming the disk checkpoint.

The transport is TCP with the snapshot protocol's token-checked frames, not the gloo group of the snapshot
processes: a collective group fails as a whole when one member dies, which is exactly when rebuild must work, and a
replacement would need a new group formed with the survivors; point-to-point connections with a timeout each name
the peer that failed and leave the others working.
"""

from __future__ import annotations

import secrets
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from regrow.checkpoint.node import coded_buffer as ecbuf
from regrow.checkpoint.node.erasure import Buffer, ErasureCodingConfig, Geometry, NotRecoverable, ParityPiece
from regrow.checkpoint.node.group_code import GroupCode
from regrow.checkpoint.snapshot.protocol import ProtocolError, SnapshotClient, SnapshotProcessLost

KEEP_COMPLETE = 2
LOG_EVERY_S = 60.0
"""Completed rounds are logged at most this often (failed ones always)."""


def log(text: str) -> None:
    print(f"[snapshot process] erasure coding: {text}", flush=True)


class _Superseded(Exception):
    """The leader proposed another round (or the process stops) while a round ran."""


class _Abandoned(Exception):
    """The round's step lost its meaning while it ran (see :meth:`PeerCoding._abandon_round`)."""


class _Passed(Exception):
    """A node had already snapshotted past the proposed step, so its slots of that step could not be held."""


HOLDER = "erasure-coding"
"""The name under which encode rounds hold segment slots (``NodeSegments.hold``)."""


@dataclass
class _Inbox:
    sizes: dict[int, int] = field(default_factory=dict)
    pieces: dict[tuple[int, int], bytearray] = field(default_factory=dict)  # (node, piece) -> bytes
    created: float = field(default_factory=time.monotonic)  # when its first message came


@dataclass
class _Complete:
    buffer: bytearray | np.ndarray
    parity: list[ParityPiece]


def _piece_header(piece: ParityPiece) -> dict:
    return {"stripe": piece.stripe, "parity_index": piece.parity_index, "holder": piece.holder,
            "sizes": list(piece.sizes), "chunk_bytes": piece.chunk_bytes, "parity_crcs": list(piece.parity_crcs),
            "data_crcs": [list(row) for row in piece.data_crcs]}


def _piece_from(header: dict, data: bytearray) -> ParityPiece:
    return ParityPiece(stripe=int(header["stripe"]), parity_index=int(header["parity_index"]),
                       holder=int(header["holder"]), data=np.frombuffer(data, dtype=np.uint8),
                       sizes=tuple(int(x) for x in header["sizes"]), chunk_bytes=int(header["chunk_bytes"]),
                       parity_crcs=tuple(int(x) for x in header["parity_crcs"]),
                       data_crcs=tuple(tuple(int(x) for x in row) for row in header["data_crcs"]))


class PeerCoding:
    """The erasure-coding side of one snapshot process: the coding thread, the ``ec_*`` ops, and rebuild.

    Thread-safe: ops arrive on the server's connection threads, rounds run on one coding thread."""

    def __init__(self, config: ErasureCodingConfig, token: str, node_segments: ecbuf.NodeSegments) -> None:
        self.config = config
        self.code = GroupCode(config)
        self._token = token
        self._segments = node_segments
        self.node: int | None = None
        self.peers: list[str] = []
        self._cond = threading.Condition()
        self._ready: int | None = None  # newest step every local rank has committed
        self._round_step: int | None = None  # the step of the round running, if any
        self._round_id: str | None = None  # its id: the leader names every round, messages carry the name
        self._proposal: tuple[int, str] | None = None  # follower: the leader's latest (step, round id)
        self._retry_from: int | None = None  # leader: a proposal was passed; propose at least this step next
        self._done_step: int | None = None  # leader: the last round's step (the next one encodes a newer step)
        self._resume_from: int | None = None  # a rollback during the running round: its end goes on from here
        self._done_id: str | None = None  # follower: the last round's id (the next one joins another)
        self._generation = 0  # bumped by _abandon_round: a round of an older generation ends
        self._round_generation = 0
        self._abandoned_why = ""
        self.rounds_completed = 0
        self.round_seconds: list[float] = []
        """Durations of the last 20 completed rounds."""
        self._last_logged = -LOG_EVERY_S
        self._stop = False
        self._inbox: dict[tuple[int, str], _Inbox] = {}  # (step, round id) -> what peers sent for that round
        self._complete: dict[int, _Complete] = {}
        self._clients: dict[int, SnapshotClient] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True, name="regrow-ec-rounds")
        self._thread.start()

    # ------------------------------------------------------------ control
    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for client in list(self._clients.values()):
            client.close()

    def local_ready(self, step: int) -> None:
        """All local ranks committed ``step``: the next round (when none runs) encodes it or a newer one."""
        with self._cond:
            if self._ready is None or step > self._ready:
                self._ready = step
                self._cond.notify_all()

    def handle(self, op: str, request: dict, payload: bytearray | None) -> tuple[dict, bytes | bytearray | None]:
        """Answers one ``ec_*`` request (the table in docs/snapshot-protocol.md)."""
        if op == "ec_group":
            return self._set_group(int(request["node"]), [str(a) for a in request["peers"]]), None
        if op == "ec_propose":
            return self._on_proposal(int(request["step"]), str(request["round"])), None
        if op == "ec_size":
            with self._cond:
                box = self._box(int(request["step"]), str(request["round"]))
                box.sizes[int(request["node"])] = int(request["size"])
                self._cond.notify_all()
            return {"ok": True}, None
        if op == "ec_piece":
            if payload is None:
                raise ValueError("ec_piece carries no raw payload")
            with self._cond:
                box = self._box(int(request["step"]), str(request["round"]))
                box.pieces[(int(request["node"]), int(request["piece"]))] = payload
                self._cond.notify_all()
            return {"ok": True}, None
        if op == "ec_status":
            with self._cond:
                return {"ok": True, "node": self.node, "complete": sorted(self._complete),
                        "round": self._round_step, "ready": self._ready,
                        "rounds_completed": self.rounds_completed, "round_seconds": self.round_seconds}, None
        if op == "ec_fetch":
            return self._fetch(int(request["step"]), str(request["what"]), int(request.get("index", 0)))
        if op == "ec_rebuild":
            return self.rebuild(), None
        if op == "ec_rollback":
            return self.rollback(int(request["rank"]), int(request["step"])), None
        raise ValueError(f"unknown op {op!r} (ec_group, ec_propose, ec_size, ec_piece, ec_status, ec_fetch, "
                         f"ec_rebuild, ec_rollback)")

    def _set_group(self, node: int, peers: list[str]) -> dict:
        if len(peers) != self.config.ec_group_size or not 0 <= node < len(peers):
            raise ValueError(f"ec_group: node {node} and {len(peers)} peers do not fit ec_group_size="
                             f"{self.config.ec_group_size}")
        with self._cond:
            changed = [i for i, address in enumerate(peers) if i < len(self.peers) and self.peers[i] != address]
            self.node, self.peers = node, peers
            for i in changed:
                client = self._clients.pop(i, None)
                if client is not None:
                    client.close()
            if changed:
                # A round waiting for a replaced member would wait peer_timeout_s (30 s) for pieces that its dead
                # process will never send; meanwhile no step gets encoded, and a second loss in that window found
                # nothing to rebuild from. The round ends now and the next one includes the replacement.
                self._abandon_round(f"node(s) {changed} of the group were replaced")
        log(f"node {node} of a group of {len(peers)} (parity {self.config.ec_parity})")
        return {"ok": True}

    def rolled_back(self, step: int) -> None:
        """A local rank went back to ``step`` (it re-attached after a restore; the snapshot process has already
        forgotten its commits of later steps). A round of a later step ends: this node may have packed that step
        from the history the job left, while the others would pack its re-run. Steps after ``step`` become
        encodable again, and a proposal of a later step from before the rollback is dropped. Every rank of a job
        that goes back re-attaches before any step is re-run, so every member ends such a round before any re-run
        snapshot exists, and the next rounds (new ids) hold only re-run snapshots."""
        with self._cond:
            if self._round_step is not None and self._round_step > step:
                self._abandon_round(f"the local ranks went back to step {step}")
                self._resume_from = step if self._resume_from is None else min(self._resume_from, step)
            if self._done_step is not None and self._done_step > step:
                self._done_step = step
            if self._ready is not None and self._ready > step:
                self._ready = step
            if self._proposal is not None and self._proposal[0] > step:
                self._proposal = None
            self._retry_from = None

    def _abandon_round(self, why: str) -> None:
        """Ends the running round at its next check (lock held); the next round starts from the newest step."""
        self._generation += 1
        self._abandoned_why = why
        self._cond.notify_all()

    def _box(self, step: int, round_id: str) -> _Inbox:
        """The inbox of one round (under the lock). Keyed by the round's id, not only its step: a message of an
        abandoned round of the same step (sent before the rollback, arriving late) must never count in its
        re-run's round. Inboxes of steps up to a finished round's are pruned then."""
        return self._inbox.setdefault((step, round_id), _Inbox())

    # ------------------------------------------------------------ encode rounds
    @property
    def leader(self) -> bool:
        """Node 0 of the group proposes the step every round encodes."""
        return self.node == 0

    def _next_round(self) -> tuple[int, str] | None:
        """The (step, id) of the next round (lock held), or None to keep waiting: the leader's newest committed
        step (or, after a proposal a peer had already passed, the step after it) under a new id; a follower's
        latest proposal, if it has not run it yet."""
        if self.node is None:
            return None
        if self.leader:
            if self._ready is None:
                return None
            step = max(self._ready, self._retry_from or 0)
            if self._done_step is not None and step <= self._done_step:
                return None
            return step, secrets.token_hex(4)
        if self._proposal is None or self._proposal[1] == self._done_id:
            return None
        return self._proposal

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (upcoming := self._next_round()) is None:
                    self._cond.wait()
                if self._stop:
                    return
                assert upcoming is not None
                step, round_id = upcoming
                self._round_step, self._round_id = step, round_id
                self._round_generation = self._generation
            started = time.monotonic()
            try:
                self._round(step, round_id)
                self.round_seconds = [*self.round_seconds[-19:], round(time.monotonic() - started, 3)]
                # One line per round would flood a log at a snapshot per step: the first, then one a minute.
                if time.monotonic() - self._last_logged >= LOG_EVERY_S:
                    self._last_logged = time.monotonic()
                    log(f"node {self.node}: step {step} encoded in {time.monotonic() - started:.2f} s "
                        f"({self.rounds_completed} rounds so far)")
            except _Abandoned:
                log(f"node {self.node}: encode of step {step} abandoned: {self._abandoned_why}")
            except _Superseded:
                proposed = self._proposal[0] if self._proposal else None
                log(f"node {self.node}: encode of step {step} left for step {proposed}, which the leader proposed")
            except _Passed as passed:
                log(f"node {self.node}: step {step} not encoded: {passed}; proposing step {step + 1} next")
                with self._cond:
                    self._retry_from = step + 1
            except (OSError, ProtocolError, TimeoutError, ecbuf.BufferError, KeyError, ValueError) as error:
                log(f"node {self.node}: encode of step {step} failed: {error}")
            finally:
                self._segments.release(HOLDER, step)
            self._finish_round(step, round_id, started)
            if self.config.min_interval_s:
                time.sleep(self.config.min_interval_s)

    def _finish_round(self, step: int, round_id: str, started: float) -> None:
        """Bookkeeping at the end of the round (``step``, ``round_id``) that started at ``started``, however it
        ended. A round abandoned for a replaced member is not run again; after a rollback, steps after the one the
        ranks went back to are encodable again (they will be re-run). Inboxes of rounds that will not complete
        any more are pruned (they would pin memory): this round's, and those of steps up to it that were opened
        before it started. One opened since may belong to a round of a re-run step that the other nodes already
        run while this thread was still ending an abandoned one: pruning it would lose their messages and stall
        that round until ``peer_timeout_s``."""
        with self._cond:
            self._done_step = step if self._resume_from is None else min(step, self._resume_from)
            self._resume_from = None
            self._done_id = round_id
            self._round_step = self._round_id = None
            for key in [key for key, box in self._inbox.items()
                        if key[1] == round_id or (key[0] <= step and box.created < started)]:
                del self._inbox[key]

    def _check(self, step: int) -> None:
        """Raises :class:`_Superseded` when the process stops or the leader proposed another round, and
        :class:`_Abandoned` when :meth:`_abandon_round` ran since the round started."""
        if self._stop or (not self.leader and self._proposal is not None and self._proposal[1] != self._round_id):
            raise _Superseded
        if self._generation != self._round_generation:
            raise _Abandoned

    def _wait(self, step: int, ready: Callable[[], bool], missing: Callable[[], str]) -> None:
        """Waits (lock held by the caller) until ``ready()``; raises on supersession, or after ``peer_timeout_s``
        naming what is ``missing()``."""
        deadline = time.monotonic() + self.config.peer_timeout_s
        while not ready():
            self._check(step)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"step {step}: still missing {missing()} after {self.config.peer_timeout_s} s")
            self._cond.wait(min(left, 0.5))

    def _propose(self, step: int, round_id: str) -> None:
        """The leader asks every follower to hold and encode ``step`` in round ``round_id``; raises
        :class:`_Passed` if one is past it."""
        for peer in range(self.code.n):
            if peer == self.node:
                continue
            reply, _ = self._call(peer, {"op": "ec_propose", "step": step, "round": round_id})
            if reply.get("hold") == "past":
                raise _Passed(f"node {peer} has already snapshotted past it")

    def _on_proposal(self, step: int, round_id: str) -> dict:
        """A follower receives the leader's proposal: holds the step's slots (now or at their COMMIT) and starts
        the round, superseding one still running."""
        hold = self._segments.hold(HOLDER, step)
        if hold != "past":
            with self._cond:
                self._proposal = (step, round_id)
                self._cond.notify_all()
        return {"ok": True, "hold": hold}

    def _pack_held(self, step: int, round_id: str) -> bytearray:
        """This node's buffer of ``step``, packed from slots held for it (so no sink overwrites them meanwhile)."""
        if self.leader:
            if self._segments.hold(HOLDER, step) == "past":
                raise _Passed("a local rank has already snapshotted past it")
            self._propose(step, round_id)
        with self._cond:
            self._wait(step, lambda: self._segments.holds_ready(HOLDER, step),
                       lambda: "the local ranks' COMMITs of the step (their slots are held when they commit it)")
        try:
            return ecbuf.pack(step, self._segments.sealed_segments(step), threads=self.config.pack_threads)
        finally:
            self._segments.release(HOLDER, step)

    def _round(self, step: int, round_id: str) -> None:
        me, n = self.node, self.code.n
        assert me is not None
        buffer = self._pack_held(step, round_id)
        with self._cond:
            self._check(step)
            self._box(step, round_id).sizes[me] = len(buffer)
        for peer in range(n):
            if peer != me:
                self._call(peer, {"op": "ec_size", "step": step, "round": round_id, "node": me,
                                  "size": len(buffer)})
        with self._cond:
            box = self._box(step, round_id)
            self._wait(step, lambda: len(box.sizes) == n,
                       lambda: f"the sizes of nodes {sorted(set(range(n)) - set(box.sizes))}")
            geo = self.code.geometry([box.sizes[i] for i in range(n)])
        for piece in range(self.code.k):
            data = self.code.data_piece(buffer, piece, geo)
            for holder in self.code.placement()[self.code.stripe_of(me, piece)].parity_nodes:
                if holder == me:
                    with self._cond:
                        box.pieces[(me, piece)] = bytearray(data)
                else:
                    self._check(step)
                    self._call(holder, {"op": "ec_piece", "step": step, "round": round_id, "node": me,
                                        "piece": piece}, data)
        wanted = [(slot.node, slot.piece) for s in self.code.parity_stripes(me)
                  for slot in self.code.placement()[s].data]
        with self._cond:
            self._wait(step, lambda: all(key in box.pieces for key in wanted),
                       lambda: f"data pieces (node, piece) {[key for key in wanted if key not in box.pieces]}")
        parity = self._own_parity(geo, lambda node, piece: box.pieces[(node, piece)], lambda: self._check(step))
        with self._cond:
            self._keep_complete(step, buffer, parity)
            self.rounds_completed += 1

    def _own_parity(self, geo: Geometry, data_piece: Callable[[int, int], Buffer],
                    before_stripe: Callable[[], None] = lambda: None) -> list[ParityPiece]:
        """This node's parity pieces of a step: each stripe it holds parity of, encoded from that stripe's data
        pieces (``data_piece(node, piece)``); ``before_stripe`` runs before each (a round's supersession check)."""
        parity = []
        for s in self.code.parity_stripes(self.node):
            before_stripe()
            data = [data_piece(slot.node, slot.piece) for slot in self.code.placement()[s].data]
            parity += [piece for piece in self.code.encode_stripe(s, data, geo) if piece.holder == self.node]
        return parity

    def _keep_complete(self, step: int, buffer: bytearray | np.ndarray, parity: list[ParityPiece]) -> None:
        """Holds ``step`` complete here (lock held), with the newest KEEP_COMPLETE steps before it."""
        self._complete[step] = _Complete(buffer=buffer, parity=parity)
        for old in sorted(self._complete)[:-KEEP_COMPLETE]:
            del self._complete[old]

    def _client(self, peer: int) -> SnapshotClient:
        client = self._clients.get(peer)
        if client is None:
            client = SnapshotClient(self.peers[peer], token=self._token, timeout_s=self.config.peer_timeout_s)
            self._clients[peer] = client
        return client

    def _call(self, peer: int, message: dict,
              payload: bytes | bytearray | memoryview | np.ndarray | None = None) -> tuple[dict, bytearray | None]:
        """One request to node ``peer``; a failure names the peer and drops its connection (reopened next time)."""
        try:
            return self._client(peer).exchange(message, None if payload is None else memoryview(payload))
        except (SnapshotProcessLost, ProtocolError, OSError) as error:
            client = self._clients.pop(peer, None)
            if client is not None:
                client.close()
            raise ProtocolError(f"peer node {peer} at {self.peers[peer]}: {message['op']} failed: {error}") from None

    # ------------------------------------------------------------ serving and rebuilding
    def _fetch(self, step: int, what: str, index: int) -> tuple[dict, bytes | bytearray]:
        with self._cond:
            held = self._complete.get(step)
        if held is None:
            raise KeyError(f"step {step} is not complete here (complete: {sorted(self._complete)})")
        if what == "buffer":
            return {"ok": True}, held.buffer
        if what == "parity":
            piece = held.parity[index]
            return {"ok": True, "piece": _piece_header(piece)}, piece.data
        raise ValueError(f"ec_fetch what={what!r}: 'buffer' or 'parity'")

    def rebuild(self) -> dict:
        """Rebuilds this node's segments from its peers (see the module docstring); returns ``{"ok", "step",
        "ranks", "lost"}``. Raises :class:`NotRecoverable` when fewer than n - p nodes hold a common step."""
        me, n, p = self.node, self.code.n, self.code.p
        if me is None:
            raise ValueError("ec_rebuild before ec_group: this process does not know its node id and peers")
        holders: dict[int, set[int]] = {}
        unreachable: list[str] = []
        for peer in range(n):
            if peer == me:
                continue
            try:
                reply, _ = self._call(peer, {"op": "ec_status"})
            except ProtocolError as error:
                unreachable.append(str(error))
                continue
            for step in reply["complete"]:
                holders.setdefault(int(step), set()).add(peer)
        # A step every reachable survivor holds comes first: the ranks of the whole job must restore one common
        # step, and a survivor can roll its own ranks back only to a step it holds complete (``rollback``).
        reachable = max((len(h) for h in holders.values()), default=0)
        usable = sorted((step for step in holders if len(holders[step]) >= n - p),
                        key=lambda step: (len(holders[step]) == reachable, step), reverse=True)
        if not usable:
            raise NotRecoverable(
                f"node {me}: no step is held complete by the {n - p} nodes a rebuild needs (group of {n}, parity "
                f"{p}; holders per step {dict((s, sorted(h)) for s, h in holders.items())}; unreachable: "
                f"{unreachable or 'none'}): more than {p} nodes of the group are lost, recovery needs the disk "
                f"checkpoint (checkpoint.reshard.restore_trainer)")
        step = usable[0]
        survivors = sorted(holders[step])
        lost = sorted(set(range(n)) - set(survivors))
        buffers, parity = {}, {}
        for peer in survivors:
            buffers[peer] = self._call(peer, {"op": "ec_fetch", "step": step, "what": "buffer"})[1]
            parity[peer] = []
            for q in range(p):
                header, data = self._call(peer, {"op": "ec_fetch", "step": step, "what": "parity", "index": q})
                parity[peer].append(_piece_from(header["piece"], data))
        decoded = self.code.decode(lost, buffers, parity)
        rebuilt = decoded[me]
        got_step, segments = ecbuf.unpack(rebuilt)
        if got_step != step:
            raise ecbuf.BufferError(f"decoded buffer is of step {got_step}, expected {step}")
        for segment in segments:
            self._segments.install(segment, step)
        self._keep_rebuilt(step, {**buffers, **decoded})
        ranks = [segment.rank for segment in segments]
        log(f"node {me}: rebuilt step {step} (ranks {ranks}) from nodes {survivors}; lost nodes {lost}; crc "
            f"{zlib.crc32(rebuilt):08x}")
        return {"ok": True, "step": step, "ranks": ranks, "lost": lost}

    def _keep_rebuilt(self, step: int, buffers: dict[int, bytearray | np.ndarray]) -> None:
        """Computes this node's parity pieces of ``step`` from every node's buffer (``buffers``: the survivors'
        and the decoded ones) and keeps the step complete here, as a round would have. Without it the rebuilt
        node held no complete step until the next round completed, so a further loss in that window could leave
        fewer than n - p holders of any step, and the job fell back to the disk checkpoint."""
        geo = self.code.geometry([len(buffers[node]) for node in range(self.code.n)])
        parity = self._own_parity(geo, lambda node, piece: self.code.data_piece(buffers[node], piece, geo))
        with self._cond:
            self._keep_complete(step, buffers[self.node], parity)

    def rollback(self, rank: int, step: int) -> dict:
        """Writes local rank ``rank``'s snapshot of ``step``, from this node's own erasure-coding buffer of that
        step, back into the rank's segment slot (overwriting what the slot holds), committed; returns ``{"ok",
        "rank", "step", "slot"}``. Used when the job must restore a step that the rank's segments no longer hold
        (a lost node was rebuilt at an older step) or that they hold corrupt. Call only while the rank is not
        snapshotting (during its restore)."""
        with self._cond:
            held = self._complete.get(step)
            complete = sorted(self._complete)
        if held is None:
            raise KeyError(f"step {step} is not complete in this node's erasure-coding buffers (complete: "
                           f"{complete})")
        _, segments = ecbuf.unpack(held.buffer, rank=rank)
        if not segments:
            raise KeyError(f"rank {rank} is not in this node's buffer of step {step}")
        self._segments.install(segments[0], step, replace=True)
        log(f"node {self.node}: rank {rank} rolled back to step {step} from the node's own coded buffer")
        return {"ok": True, "rank": rank, "step": step, "slot": segments[0].slot}
