"""Erasure coding between the snapshot processes of a group: the encode rounds, on the process's coding thread.

Each snapshot process is node ``i`` of a group of n (``ec_group_size``) tolerating p losses (``ec_parity``); the
placement is :class:`regrow.checkpoint.node.erasure.RotatingParity`'s rotating parity. A node's buffer is its local
ranks' sealed segments of one step (``coded_buffer.py``). Steps are agreed through the group's leader, node 0
(``round_schedule.py``): it names every round and proposes (``ec_propose``) the newest step all its local ranks
have committed; each member holds its ranks' slots of that step (now, or at their COMMIT of it) or answers that it
is past it, and the leader then proposes the step after. (An earlier version let every node encode its own newest
step and every newer local snapshot supersede the running round; with a snapshot every step and a round longer
than a step, no round ever completed.) One round:

1. pack the buffer (one copy of the held slots, checked not to have been overwritten meanwhile); send ``ec_size``
   (step, node, bytes) to every peer;
2. once all n sizes of s are in, cut the buffer into k = n - p pieces (``GroupCode.geometry``) and send piece j to
   the p parity holders of its stripe (``ec_piece`` with the bytes as raw payload);
3. once the k data pieces of each of its p stripes are in, compute their parity (``GroupCode.encode_stripe``) and
   keep buffer and parity as "complete" for s (``complete_steps.py``: the newest two complete steps are kept, so a
   round that dies half way leaves the previous step complete on every node).

Snapshots that arrive while a round runs are not queued: when it ends, the newest is taken. A round whose peer
stopped answering times out (``peer_timeout_s``), or ends at once when ``ec_group`` replaces that peer or the local
ranks go back to an earlier step (:meth:`PeerCoding.rolled_back`), and the next round starts from the newest step.
Every round has an id the leader gives it, carried by all its messages. Everything runs on the process's coding
thread, off the training path (ranks only COMMIT). The connections to the peers are ``peer_links.py``; rebuilding
a lost node and rolling a rank back are ``rebuild.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from regrow.checkpoint.node import coded_buffer as ecbuf
from regrow.checkpoint.node.complete_steps import CompleteSteps
from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.group_code import GroupCode
from regrow.checkpoint.node.log import ec_log as log
from regrow.checkpoint.node.peer_links import PeerLinks
from regrow.checkpoint.node.rebuild import NodeRebuild
from regrow.checkpoint.node.round_schedule import RoundAbandoned, RoundSchedule, RoundSuperseded, StepPassed
from regrow.checkpoint.snapshot.protocol import ProtocolError

LOG_EVERY_S = 60.0
"""Completed rounds are logged at most this often (failed ones always)."""

HOLDER = "erasure-coding"
"""The name under which encode rounds hold segment slots (``NodeSegments.hold``)."""


@dataclass
class _Inbox:
    sizes: dict[int, int] = field(default_factory=dict)
    pieces: dict[tuple[int, int], bytearray] = field(default_factory=dict)  # (node, piece) -> bytes
    created: float = field(default_factory=time.monotonic)  # when its first message came


class PeerCoding:
    """The erasure-coding side of one snapshot process: the coding thread running the encode rounds, and the
    ``ec_*`` ops (rebuild and rollback are :class:`NodeRebuild`'s, on the same peers and complete steps).

    Thread-safe: ops arrive on the server's connection threads, rounds run on one coding thread. Lock order: this
    object's condition, then the segments' lock (the coding thread holds slots while it waits)."""

    def __init__(self, config: ErasureCodingConfig, token: str, node_segments: ecbuf.NodeSegments, *,
                 round_hook: Callable[[int], None] | None = None) -> None:
        """``round_hook(step)`` runs on the coding thread in every round, once the sizes are exchanged and before
        this node sends its pieces (the peers then wait for them): fault injection kills the process there."""
        self.config = config
        self._round_hook = round_hook
        self.code = GroupCode(config)
        self._segments = node_segments
        self._links = PeerLinks(token, timeout_s=config.peer_timeout_s)
        self._complete = CompleteSteps()
        self._rebuild = NodeRebuild(self.code, self._links, self._complete, node_segments)
        self._cond = threading.Condition()
        self._schedule = RoundSchedule()
        self.rounds_completed = 0
        self.round_seconds: list[float] = []
        """Durations of the last 20 completed rounds."""
        self._last_logged = -LOG_EVERY_S
        self._stop = False
        self._inbox: dict[tuple[int, str], _Inbox] = {}  # (step, round id) -> what peers sent for that round
        self._thread = threading.Thread(target=self._loop, daemon=True, name="regrow-ec-rounds")
        self._thread.start()

    @property
    def node(self) -> int | None:
        """This process's node id in its group; None before ``ec_group``."""
        return self._links.node

    @property
    def leader(self) -> bool:
        """Node 0 of the group proposes the step every round encodes."""
        return self.node == 0

    # ------------------------------------------------------------ control
    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._links.close()

    def local_ready(self, step: int) -> None:
        """All local ranks committed ``step``: the next round (when none runs) encodes it or a newer one."""
        with self._cond:
            if self._schedule.local_ready(step):
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
                return {"ok": True, "node": self.node, "complete": self._complete.steps(),
                        "round": self._schedule.step, "ready": self._schedule.ready,
                        "rounds_completed": self.rounds_completed, "round_seconds": self.round_seconds}, None
        if op == "ec_fetch":
            return self._complete.fetch(int(request["step"]), str(request["what"]), int(request.get("index", 0)))
        if op == "ec_rebuild":
            return self._rebuild.rebuild(), None
        if op == "ec_rollback":
            return self._rebuild.rollback(int(request["rank"]), int(request["step"])), None
        raise ValueError(f"unknown op {op!r} (ec_group, ec_propose, ec_size, ec_piece, ec_status, ec_fetch, "
                         f"ec_rebuild, ec_rollback)")

    def _set_group(self, node: int, peers: list[str]) -> dict:
        if len(peers) != self.config.ec_group_size or not 0 <= node < len(peers):
            raise ValueError(f"ec_group: node {node} and {len(peers)} peers do not fit ec_group_size="
                             f"{self.config.ec_group_size}")
        with self._cond:
            changed = self._links.set_group(node, peers)
            if changed:
                # A round waiting for a replaced member would wait peer_timeout_s (30 s) for pieces that its dead
                # process will never send; meanwhile no step gets encoded, and a second loss in that window found
                # nothing to rebuild from. The round ends now and the next one includes the replacement.
                self._schedule.abandon(f"node(s) {changed} of the group were replaced")
                self._cond.notify_all()
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
            if self._schedule.rolled_back(step):
                self._cond.notify_all()

    def _box(self, step: int, round_id: str) -> _Inbox:
        """The inbox of one round (under the lock). Keyed by the round's id, not only its step: a message of an
        abandoned round of the same step (sent before the rollback, arriving late) must never count in its
        re-run's round. Inboxes of steps up to a finished round's are pruned then."""
        return self._inbox.setdefault((step, round_id), _Inbox())

    # ------------------------------------------------------------ encode rounds
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (upcoming := self._schedule.next_round(self.node)) is None:
                    self._cond.wait()
                if self._stop:
                    return
                assert upcoming is not None
                step, round_id = upcoming
                self._schedule.start(step, round_id)
            started = time.monotonic()
            try:
                self._round(step, round_id)
                self.round_seconds = [*self.round_seconds[-19:], round(time.monotonic() - started, 3)]
                # One line per round would flood a log at a snapshot per step: the first, then one a minute.
                if time.monotonic() - self._last_logged >= LOG_EVERY_S:
                    self._last_logged = time.monotonic()
                    log(f"node {self.node}: step {step} encoded in {time.monotonic() - started:.2f} s "
                        f"({self.rounds_completed} rounds so far)")
            except RoundAbandoned:
                log(f"node {self.node}: encode of step {step} abandoned: {self._schedule.abandoned_why}")
            except RoundSuperseded:
                proposal = self._schedule.proposal
                proposed = proposal[0] if proposal else None
                log(f"node {self.node}: encode of step {step} left for step {proposed}, which the leader proposed")
            except StepPassed as passed:
                log(f"node {self.node}: step {step} not encoded: {passed}; proposing step {step + 1} next")
                with self._cond:
                    self._schedule.passed(step)
            except (OSError, ProtocolError, TimeoutError, ecbuf.BufferError, KeyError, ValueError) as error:
                log(f"node {self.node}: encode of step {step} failed: {error}")
            finally:
                self._segments.release(HOLDER, step)
            self._finish_round(step, round_id, started)
            if self.config.min_interval_s:
                time.sleep(self.config.min_interval_s)

    def _finish_round(self, step: int, round_id: str, started: float) -> None:
        """Bookkeeping at the end of the round (``step``, ``round_id``) that started at ``started``, however it
        ended (:meth:`RoundSchedule.finish`). Inboxes of rounds that will not complete any more are pruned (they
        would pin memory): this round's, and those of steps up to it that were opened before it started. One
        opened since may belong to a round of a re-run step that the other nodes already run while this thread
        was still ending an abandoned one: pruning it would lose their messages and stall that round until
        ``peer_timeout_s``."""
        with self._cond:
            self._schedule.finish(step, round_id)
            for key in [key for key, box in self._inbox.items()
                        if key[1] == round_id or (key[0] <= step and box.created < started)]:
                del self._inbox[key]

    def _check(self) -> None:
        """Raises :class:`RoundSuperseded` when the process stops or the leader proposed another round, and
        :class:`RoundAbandoned` when the round was abandoned since it started."""
        if self._stop:
            raise RoundSuperseded
        self._schedule.check(leader=self.leader)

    def _wait(self, step: int, ready: Callable[[], bool], missing: Callable[[], str]) -> None:
        """Waits (lock held by the caller) until ``ready()``; raises on supersession, or after ``peer_timeout_s``
        naming what is ``missing()``."""
        deadline = time.monotonic() + self.config.peer_timeout_s
        while not ready():
            self._check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"step {step}: still missing {missing()} after {self.config.peer_timeout_s} s")
            self._cond.wait(min(left, 0.5))

    def _propose(self, step: int, round_id: str) -> None:
        """The leader asks every follower to hold and encode ``step`` in round ``round_id``; raises
        :class:`StepPassed` if one is past it."""
        for peer in range(self.code.n):
            if peer == self.node:
                continue
            reply, _ = self._links.call(peer, {"op": "ec_propose", "step": step, "round": round_id})
            if reply.get("hold") == "past":
                raise StepPassed(f"node {peer} has already snapshotted past it")

    def _on_proposal(self, step: int, round_id: str) -> dict:
        """A follower receives the leader's proposal: holds the step's slots (now or at their COMMIT) and starts
        the round, superseding one still running."""
        hold = self._segments.hold(HOLDER, step)
        if hold != "past":
            with self._cond:
                self._schedule.proposed(step, round_id)
                self._cond.notify_all()
        return {"ok": True, "hold": hold}

    def _pack_held(self, step: int, round_id: str) -> bytearray:
        """This node's buffer of ``step``, packed from slots held for it (so no sink overwrites them meanwhile)."""
        if self.leader:
            if self._segments.hold(HOLDER, step) == "past":
                raise StepPassed("a local rank has already snapshotted past it")
            self._propose(step, round_id)
        with self._cond:
            self._wait(step, lambda: self._segments.holds_ready(HOLDER, step),
                       lambda: "the local ranks' COMMITs of the step (their slots are held when they commit it)")
        try:
            return ecbuf.pack(step, self._segments.sealed_segments(step), threads=self.config.pack_threads)
        finally:
            self._segments.release(HOLDER, step)

    def _round(self, step: int, round_id: str) -> None:
        me, n, code = self.node, self.code.n, self.code
        assert me is not None
        buffer = self._pack_held(step, round_id)
        with self._cond:
            self._check()
            self._box(step, round_id).sizes[me] = len(buffer)
        for peer in range(n):
            if peer != me:
                self._links.call(peer, {"op": "ec_size", "step": step, "round": round_id, "node": me,
                                        "size": len(buffer)})
        with self._cond:
            box = self._box(step, round_id)
            self._wait(step, lambda: len(box.sizes) == n,
                       lambda: f"the sizes of nodes {sorted(set(range(n)) - set(box.sizes))}")
            geo = code.geometry([box.sizes[i] for i in range(n)])
        if self._round_hook is not None:
            self._round_hook(step)
        for piece in range(code.k):
            data = code.data_piece(buffer, piece, geo)
            for holder in code.placement()[code.stripe_of(me, piece)].parity_nodes:
                if holder == me:
                    with self._cond:
                        box.pieces[(me, piece)] = bytearray(data)
                else:
                    self._check()
                    self._links.call(holder, {"op": "ec_piece", "step": step, "round": round_id, "node": me,
                                              "piece": piece}, data)
        wanted = [(slot.node, slot.piece) for s in code.parity_stripes(me) for slot in code.placement()[s].data]
        with self._cond:
            self._wait(step, lambda: all(key in box.pieces for key in wanted),
                       lambda: f"data pieces (node, piece) {[key for key in wanted if key not in box.pieces]}")
        parity = code.node_parity(me, geo, lambda node, piece: box.pieces[(node, piece)], self._check)
        self._complete.keep(step, buffer, parity)
        with self._cond:
            self.rounds_completed += 1
